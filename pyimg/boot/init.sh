#!/bin/sh
# pyimg's initramfs init (busybox sh), docs/boot.md.  It loads the modules listed in
# /lib/modules/load-order, waits for root=, mounts it read-only on /newroot, brings
# the boot config (/pyimg/config, from an appended initrd) to /run/pyimg/config and
# the environment, and switch_roots into init= (default /sbin/init).  On any failure
# it prints one line "pyimg-initramfs: error: WHAT" and powers off.
#
# Kernel command line: root=/dev/X | UUID=... | LABEL=...  rootfstype=  rootflags=
# init=  pyimg.rootwait=SECONDS (default 10)  pyimg.debug (trace)  pyimg.shell (a shell
# instead of powering off on failure).  The root is always mounted read-only.
# Every variable of this script starts with _pyimg (config keys cannot).

PATH=/bin
set -f  # the command line is split into words below: no globbing

_pyimg_say() { echo "pyimg-initramfs: $*"; }

_pyimg_fail() {
	echo "pyimg-initramfs: error: $*"
	if [ -n "$_pyimg_shell" ]; then
		echo "pyimg-initramfs: pyimg.shell given: starting a shell (exit it to power off)"
		sh
	fi
	poweroff -f
	sleep 5
	exit 1  # init exiting panics the kernel: with panic=-1 and -no-reboot, QEMU ends too
}

mount -t proc -o nosuid,nodev,noexec proc /proc || _pyimg_fail "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || _pyimg_fail "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || _pyimg_fail "cannot mount devtmpfs on /dev"

. /pyimg/initramfs.conf  # _pyimg_fstype: the file system this initramfs was built for

_pyimg_root=
_pyimg_init=/sbin/init
_pyimg_rootflags=
_pyimg_wait=10
_pyimg_shell=
for _pyimg_arg in $(cat /proc/cmdline); do
	case "$_pyimg_arg" in
	root=*) _pyimg_root=${_pyimg_arg#root=} ;;
	rootfstype=*) _pyimg_fstype=${_pyimg_arg#rootfstype=} ;;
	rootflags=*) _pyimg_rootflags=${_pyimg_arg#rootflags=} ;;
	init=*) _pyimg_init=${_pyimg_arg#init=} ;;
	pyimg.rootwait=*) _pyimg_wait=${_pyimg_arg#pyimg.rootwait=} ;;
	pyimg.debug) set -x ;;
	pyimg.shell) _pyimg_shell=1 ;;
	esac
done
set +f
case "$_pyimg_wait" in '' | *[!0-9]*) _pyimg_fail "pyimg.rootwait=$_pyimg_wait is not a number of seconds" ;; esac

while read -r _pyimg_mod _pyimg_need; do
	[ -n "$_pyimg_mod" ] || continue
	if ! _pyimg_out=$(insmod "/lib/modules/$_pyimg_mod.ko" 2>&1); then
		if [ "$_pyimg_need" = optional ]; then
			_pyimg_say "optional module $_pyimg_mod did not load: $_pyimg_out"
		else
			_pyimg_fail "module $_pyimg_mod did not load: $_pyimg_out"
		fi
	fi
done </lib/modules/load-order

[ -n "$_pyimg_root" ] || _pyimg_fail "no root= on the kernel command line"
_pyimg_tries=$((_pyimg_wait * 10))
_pyimg_dev=
while :; do
	case "$_pyimg_root" in
	/dev/*) [ -b "$_pyimg_root" ] && _pyimg_dev=$_pyimg_root ;;
	UUID=* | LABEL=*) _pyimg_dev=$(findfs "$_pyimg_root" 2>/dev/null) ;;
	*) _pyimg_fail "root=$_pyimg_root: expected /dev/NAME, UUID=... or LABEL=..." ;;
	esac
	[ -n "$_pyimg_dev" ] && break
	[ "$_pyimg_tries" -gt 0 ] || _pyimg_fail "root device $_pyimg_root did not appear within $_pyimg_wait s"
	_pyimg_tries=$((_pyimg_tries - 1))
	sleep 0.1
done

_pyimg_opts=ro
[ -n "$_pyimg_rootflags" ] && _pyimg_opts="ro,$_pyimg_rootflags"
if ! _pyimg_out=$(mount -t "$_pyimg_fstype" -o "$_pyimg_opts" "$_pyimg_dev" /newroot 2>&1); then
	_pyimg_fail "cannot mount $_pyimg_dev ($_pyimg_fstype, read-only): $_pyimg_out"
fi
if [ ! -e "/newroot$_pyimg_init" ] && [ ! -L "/newroot$_pyimg_init" ]; then
	_pyimg_fail "init $_pyimg_init not found on $_pyimg_dev"
fi

if [ -d /pyimg/config ]; then
	[ -d /newroot/run ] || _pyimg_fail "boot config given, but $_pyimg_dev has no /run to mount a tmpfs on"
	mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run || _pyimg_fail "cannot mount a tmpfs on /run"
	mkdir -p /newroot/run/pyimg/config && chmod 0700 /newroot/run/pyimg/config ||
		_pyimg_fail "cannot create /run/pyimg/config"
	for _pyimg_file in /pyimg/config/*; do
		[ -f "$_pyimg_file" ] || continue
		_pyimg_key=${_pyimg_file##*/}
		cp "$_pyimg_file" "/newroot/run/pyimg/config/$_pyimg_key" &&
			chmod 0600 "/newroot/run/pyimg/config/$_pyimg_key" || _pyimg_fail "cannot copy config $_pyimg_key"
		_pyimg_value=$(cat "$_pyimg_file")  # (trailing newlines are dropped here, not in the file)
		export "$_pyimg_key=$_pyimg_value"
	done
fi

for _pyimg_fs in dev proc sys; do
	if [ -d "/newroot/$_pyimg_fs" ]; then
		mount --move "/$_pyimg_fs" "/newroot/$_pyimg_fs" || umount "/$_pyimg_fs"
	else
		umount "/$_pyimg_fs"
	fi
done
_pyimg_say "root $_pyimg_dev ($_pyimg_fstype, read-only): switching to $_pyimg_init"
exec switch_root /newroot "$_pyimg_init" "$@"
