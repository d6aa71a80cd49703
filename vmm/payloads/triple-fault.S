# Flat payload: loads an empty IDT and raises #UD, which escalates to a
# triple fault (the VMM must report it, not crash).
.code64
.globl _start
_start:
  lidt idt(%rip)
  ud2
idt:
  .word 0
  .quad 0
