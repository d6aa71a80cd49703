# Flat payload: the dirty-tracking test and benchmark writer.
#
# Drops to ring 3 (guest ring 3 runs natively on this project's PVM hosts),
# then loops: signal "ready" with `out %eax, %dx` to port 0x510 (EAX = rounds done), read
# the command block the VMM left at 0x80000 and carry it out:
#   u32 op      0 = stop (reset the VM), 1 = write the listed pages
#   u32 count   number of page frame numbers that follow
#   u32 bytes   bytes to write at the start of each page (1..4096)
#   u32 value   byte value to write
#   u32 pfn[count]
# Ring-3 code uses registers only, so the payload itself dirties no page
# besides the ones it is told to write.
.code64
.include "ring3.inc"
.globl _start
_start:
  enter_ring3 user

user:
  xor %r11d, %r11d      # rounds done
round:
  mov %r11d, %eax
  mov $0x510, %dx
  out %eax, %dx
  mov $0x80000, %rsi
  mov (%rsi), %eax
  test %eax, %eax
  jz stop
  mov 4(%rsi), %r10d    # count
  mov 8(%rsi), %edx     # bytes per page
  mov 12(%rsi), %eax    # value (AL)
  lea 16(%rsi), %r8     # next pfn
page:
  test %r10d, %r10d
  jz done
  mov (%r8), %edi
  shl $12, %rdi
  mov %edx, %ecx
  rep stosb
  add $4, %r8
  dec %r10d
  jmp page
done:
  inc %r11d
  jmp round
stop:
  mov $0xfe, %al
  out %al, $0x64
1:
  jmp 1b
