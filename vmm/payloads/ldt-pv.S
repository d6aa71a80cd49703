# Flat payload playing the guest side of the ldt-pv device (protocol 1,
# README "The ldt-pv device"), as a Linux driver would, from ring 3:
#   - finds the device in the platform CPUID leaves (feature bit 1, leaf
#     0x40000102: bitmap GPA, frames, port base), announces driver version 1;
#   - keeps its own record of the frames it writes (one bit per frame at
#     RECORD, as the kernel keeps its D bits), and polls REQUEST:
#     START: clears the record, completes; HARVEST: ORs the record into the
#     device's bitmap (plus the record's own pages, which it writes all the
#     time), clears it, completes; STOP: completes.
#   - AUTO (default 1): writes the counter into a WS_PAGES-page working set,
#     one page per loop; and right after each answer, with k harvests done,
#     it writes page POST_BASE + (k mod 16), a page written at no other
#     time: after the last harvest before a pause only KVM's final-round
#     log can see that write.
#   - HARNESS=1 instead: carries out the commands the VMM writes at 0x80000
#     (`flat::LdtPvWriterVm`: u32 gen, then as the writer payload's block
#     u32 op (0 stop, 1 write), u32 count, u32 bytes, u32 value, u32 pfn[]):
#     when gen changes, writes `bytes` bytes of the value at the start of
#     each listed page, then signals `out %eax, 0x510` with EAX = gen.
#   - AUTO also registers a kvmclock area at KVMCLOCK (MSR_KVM_SYSTEM_TIME_NEW,
#     when KVM's leaf 0x40000001 offers it): a page KVM writes, never the
#     payload, which the final round must send as one of KVM's MSR areas.
# Faults on purpose (`as --defsym`): NOANNOUNCE=1 never announces,
# NOHARVEST=1 never answers HARVEST, BADSEQ=1 answers it with seq + 1,
# BADSTATUS=1 with status 1, WITHDRAW=N writes ANNOUNCE=0 after harvest N,
# HIDE=1 also writes page HIDE_PAGE all the time but never reports it (a
# driver that misses a write: the audit, `run --ldt-pv-audit`, must say so).
# CPUID runs in ring 0 first. Ring-3 code uses registers only (no stack): the pages it writes are the
# working set, the post pages and the record.
.code64
.include "ring3.inc"
.ifndef AUTO
.set AUTO, 1
.endif
.ifndef HARNESS
.set HARNESS, 0
.endif
.ifndef NOANNOUNCE
.set NOANNOUNCE, 0
.endif
.ifndef NOHARVEST
.set NOHARVEST, 0
.endif
.ifndef BADSEQ
.set BADSEQ, 0
.endif
.ifndef BADSTATUS
.set BADSTATUS, 0
.endif
.ifndef WITHDRAW
.set WITHDRAW, 0
.endif
.ifndef HIDE
.set HIDE, 0
.endif
.set RECORD, 0x180000       # up to 512 KiB: 16 GiB of frames
.set WS_BASE, 0x400000
.set WS_PAGES, 64
.set POST_BASE, 0x600000
.set CMD, 0x80000
.set KVMCLOCK, 0x700000
.set HIDE_PAGE, 0x650000
.globl _start
_start:
  # CPUID in ring 0, as a kernel does (on PVM hosts ring-3 CPUID is not
  # intercepted: it would see the host's leaves).
  mov $0x40000100, %eax
  cpuid
  cmp $0x40000102, %eax
  jb fail
  mov $0x40000101, %eax
  cpuid
  test $2, %ebx             # ldt-pv feature
  jz fail
  mov $0x40000102, %eax
  cpuid
  cmp $1, %eax              # protocol version
  jb fail
  mov %ebx, %r15d
  shl $12, %r15             # r15: bitmap GPA
  mov %ecx, %r14d           # r14: frames
  movzwl %dx, %r13d         # r13: port base
.if AUTO
  mov $0x40000000, %eax
  cpuid
  cmp $0x4b4d564b, %ebx     # "KVMK"
  jne 9f
  mov $0x40000001, %eax
  cpuid
  test $8, %eax             # KVM_FEATURE_CLOCKSOURCE2
  jz 9f
  mov $0x4b564d01, %ecx     # MSR_KVM_SYSTEM_TIME_NEW
  mov $(KVMCLOCK | 1), %eax
  xor %edx, %edx
  wrmsr
9:
.endif
  enter_ring3 user
user:
  xor %r12d, %r12d          # r12: counter
  xor %r11d, %r11d          # r11: last harness generation
  xor %r9d, %r9d            # r9: harvests answered
.if NOANNOUNCE == 0
  lea 8(%r13), %edx
  mov $1, %eax
  out %eax, %dx
.endif

loop:
  mov %r13d, %edx
  in %dx, %eax              # REQUEST: seq << 8 | cmd
  test %al, %al
  jz idle
  mov %eax, %ebx            # ebx: the request
  xor %r10d, %r10d          # r10: the status to answer with
  cmp $1, %al
  je start
  cmp $2, %al
  je harvest
  jmp complete              # STOP (and anything else): done
start:
  mov $RECORD, %rdi
  mov %r14, %rcx
  add $63, %rcx
  shr $6, %rcx
  xor %eax, %eax
  rep stosq
  jmp complete
harvest:
.if NOHARVEST
  jmp idle
.endif
  # OR the record into the bitmap word by word, clearing it.
  mov $RECORD, %rsi
  mov %r15, %rdi
  mov %r14, %rcx
  add $63, %rcx
  shr $6, %rcx
1:
  mov (%rsi), %rax
  test %rax, %rax
  jz 2f
  or %rax, (%rdi)
  movq $0, (%rsi)
2:
  add $8, %rsi
  add $8, %rdi
  dec %rcx
  jnz 1b
  # The record's own pages: written all the time, by this loop too.
  mov %r14, %rcx
  add $32767, %rcx
  shr $15, %rcx             # record pages
  mov $(RECORD >> 12), %eax
3:
  bts %rax, (%r15)
  inc %rax
  dec %rcx
  jnz 3b
  inc %r9
.if BADSEQ
  add $0x100, %ebx
.endif
.if BADSTATUS
  mov $1, %r10d
.endif
complete:
  and $0xffffff00, %ebx
  or %r10d, %ebx
  lea 4(%r13), %edx
  mov %ebx, %eax
  out %eax, %dx             # COMPLETE: seq << 8 | status
.if WITHDRAW
  cmp $WITHDRAW, %r9
  jne 5f
  lea 8(%r13), %edx
  xor %eax, %eax
  out %eax, %dx             # ANNOUNCE 0: the driver leaves
5:
.endif
.if AUTO
  # Right after the answer: a page written at no other time.
  mov %r9, %rax
  and $15, %rax
  shl $12, %rax
  add $POST_BASE, %rax
  mov %r12, (%rax)
  shr $12, %rax
  bts %rax, RECORD
.if HIDE
  # Also after every answer: rounds can follow each other with no idle
  # loop between them, and every audited round must see the write.
  mov %r12, HIDE_PAGE
.endif
.endif
  jmp loop

idle:
.if AUTO
  # One word of the working set: page r12 mod WS_PAGES, word r12 / WS_PAGES.
  mov %r12, %rax
  and $(WS_PAGES - 1), %rax
  mov %rax, %rbx
  shl $12, %rax
  mov %r12, %rcx
  shr $6, %rcx
  and $511, %rcx
  lea WS_BASE(%rax,%rcx,8), %rax
  lea 1(%r12), %rcx
  mov %rcx, (%rax)
  add $(WS_BASE >> 12), %rbx
  bts %rbx, RECORD
.if HIDE
  mov %r12, HIDE_PAGE       # written, never recorded
.endif
  inc %r12
.endif
.if HARNESS
  mov $CMD, %rsi
  mov (%rsi), %eax          # generation
  cmp %r11d, %eax
  je loop
  mov %eax, %r11d
  mov 4(%rsi), %eax
  test %eax, %eax
  jz stop
  mov 8(%rsi), %r10d        # count
  lea 20(%rsi), %r8         # next pfn
6:
  test %r10d, %r10d
  jz 7f
  mov (%r8), %edi
  mov %rdi, %rbx
  shl $12, %rdi
  mov 12(%rsi), %ecx        # bytes
  mov 16(%rsi), %eax        # value (AL)
  rep stosb
  bts %rbx, RECORD
  add $4, %r8
  dec %r10d
  jmp 6b
7:
  mov %r11d, %eax
  mov $0x510, %dx
  out %eax, %dx
.endif
  jmp loop

stop:
  mov $0xfe, %al
  out %al, $0x64
8:
  jmp 8b
fail:
  mov $0x501, %dx
  mov $9, %al
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
  jmp 8b
