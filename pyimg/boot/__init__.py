"""Boot pieces: kernels (kernel.py: check_bzimage, fetch_kernel), module resolution
(modules.py: resolve_modules, ModuleTree), the boot initramfs (initramfs.py:
build_initramfs, its init in init.sh), config at boot (config.py: load_config,
config_initrd, append_initrds) and the CLI commands (cli.py).  docs/boot.md."""
