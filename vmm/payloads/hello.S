# Flat payload: prints a line on COM1 from ring 3 and powers off.
.code64
.include "ring3.inc"
.globl _start
_start:
  enter_ring3 user
user:
  lea msg(%rip), %rsi
  mov $0x3f8, %dx
1:
  lodsb
  test %al, %al
  jz 2f
  out %al, %dx
  jmp 1b
2:
  mov $0xfe, %al
  out %al, $0x64
3:
  jmp 3b
msg:
  .asciz "hello from ring 3\n"
