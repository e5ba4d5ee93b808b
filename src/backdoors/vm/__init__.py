"""VM nodes: a QEMU guest with a kernel of its own, whose RAM the host reads without its help.

`GuestKernel` is the kernel build (Debian's cloud kernel, unpacked by `make vm-kernel`) and
its symbol profile; `initramfs.build` makes the guest's root; `Vm` runs and controls one
guest (memfd RAM, QMP, a tap in the node's netns); `GuestMemory` maps the RAM read-only and
reads kernel variables such as `jiffies`. See docs/vm-backdoor.md.
"""
