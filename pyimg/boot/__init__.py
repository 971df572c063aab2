"""pyimg boot: QEMU-side tests."""
