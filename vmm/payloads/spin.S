# Flat payload: keeps incrementing a counter at 0x300000 from ring 3, forever
# (for tests of pause, resume and dirty tracking of a running VM).
.code64
.include "ring3.inc"
.globl _start
_start:
  enter_ring3 user
user:
  mov $0x300000, %rdi
1:
  incq (%rdi)
  jmp 1b
