# Flat payload: keeps incrementing a counter at 0x300000 from ring 3, forever
# (for tests of pause, resume and dirty tracking of a running VM).
.code64
.globl _start
_start:
  mov %rsp, %rax
  push $0x1b
  push %rax
  push $0x3002
  push $0x23
  lea user(%rip), %rax
  push %rax
  iretq
user:
  mov $0x300000, %rdi
1:
  incq (%rdi)
  jmp 1b
