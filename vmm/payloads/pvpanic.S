# Flat payload: finds the pvpanic port in the platform CPUID leaf (as the
# guest kernel's vmm-0001 patch does), checks that the port offers the
# PANICKED event and reports a panic on it. Anything missing: exit status
# 9 on port 0x501, then reset.
.code64
.globl _start
_start:
  mov $0x40000100, %eax
  cpuid
  cmp $0x40000101, %eax
  jb fail
  cmp $0x2d74646c, %ebx   # "ldt-"
  jne fail
  cmp $0x2d6d6d76, %ecx   # "vmm-"
  jne fail
  cmp $0x74616c70, %edx   # "plat"
  jne fail
  mov $0x40000101, %eax
  cpuid
  cmp $1, %eax            # version
  jb fail
  test $1, %ebx           # pvpanic feature
  jz fail
  mov %ecx, %edx          # the port
  in %dx, %al
  test $1, %al            # PANICKED offered
  jz fail
  mov $1, %al
  out %al, %dx
hang:
  jmp hang
fail:
  mov $0x501, %dx
  mov $9, %al
  out %al, %dx
  mov $0xfe, %al
  out %al, $0x64
  jmp hang
