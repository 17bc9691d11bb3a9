#!/usr/bin/env bash
# Runs INSIDE the guest (tests/vm/selftest starts it): kernel features, cachefiles
# on-demand bind, a registry on the guest's loopback.
set -euo pipefail
echo "== kernel"
uname -r
grep -E 'erofs|cachefiles|overlay|ext4|hostfs' /proc/filesystems
ls -l /dev/cachefiles /dev/loop-control
cat /proc/cmdline

echo "== cachefiles on-demand bind (ext4 on a loop device; tmpfs/hostfs lack sync_fs)"
truncate -s 64M /tmp/cache.img
mkfs.ext4 -q -F /tmp/cache.img
mkdir -p /run/cache
mount -o loop /tmp/cache.img /run/cache
mkdir -p /run/cache/fscache
python3 -c "
import os
fd = os.open('/dev/cachefiles', os.O_RDWR)
os.write(fd, b'dir /run/cache/fscache')
os.write(fd, b'tag t')
os.write(fd, b'bind ondemand')
print('bound')
os.close(fd)
"
dmesg | grep -i cachefiles | tail -n 3 || true

echo "== fanotify permission events available"
python3 -c "
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
FAN_CLASS_CONTENT = 0x4
fd = libc.fanotify_init(FAN_CLASS_CONTENT, os.O_RDONLY)
print('fanotify_init(FAN_CLASS_CONTENT) =', 'ok' if fd >= 0 else os.strerror(ctypes.get_errno()))
"

echo "== registry on the guest's 127.0.0.1"
mkdir -p /tmp/reg
cat >/tmp/reg.yml <<'YML'
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: /tmp/reg
http:
  addr: 127.0.0.1:5000
YML
docker-registry serve /tmp/reg.yml >/tmp/reg.log 2>&1 &
reg=$!
for _ in $(seq 50); do
  curl -fsS -o /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null && break
  sleep 0.2
done
curl -sS -i http://127.0.0.1:5000/v2/ | tr -d '\r' | sed -n '1p;/Docker-Distribution/p'
echo
kill "$reg"
wait "$reg" 2>/dev/null || true
echo "== done"
