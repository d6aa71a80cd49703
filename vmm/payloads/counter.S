# Flat payload for migration tests: forever, print the counter as
# "c<16 hex digits>\n" on COM1, then write the counter into PAGES pages of a
# 64 MiB working set at 4 MiB (pages chosen from the counter), then spin
# SPIN iterations. PAGES and SPIN come from `as --defsym` (see build.rs), so
# one source gives payloads of different dirty rates. Ring 3 throughout.
.code64
.include "ring3.inc"
.globl _start
.set WS_BASE, 0x400000
.set WS_MASK, 16383
_start:
  enter_ring3 user
user:
  xor %r12d, %r12d          # counter
line:
  mov $0x3f8, %dx
  mov $'c', %al
  out %al, %dx
  mov %r12, %rbx
  mov $16, %ecx
hex:
  rol $4, %rbx
  mov %bl, %al
  and $0xf, %al
  add $'0', %al
  cmp $'9', %al
  jbe 1f
  add $('a' - '9' - 1), %al
1:
  out %al, %dx
  dec %ecx
  jnz hex
  mov $'\n', %al
  out %al, %dx
  mov $PAGES, %r13d
  imul $7919, %r12, %r14    # first page index for this counter value
write:
  test %r13d, %r13d
  jz spin
  mov %r14, %rdi
  and $WS_MASK, %rdi
  shl $12, %rdi
  add $WS_BASE, %rdi
  mov %r12, (%rdi)
  add $104729, %r14
  dec %r13d
  jmp write
spin:
  mov $SPIN, %ecx
2:
  dec %ecx
  jnz 2b
  inc %r12
  jmp line
