#!/usr/bin/env bash
# Freeze one node while the other serves, then move its data live to a new node.
. "$(dirname "$0")/common.sh"
serve "$WORK/a.img" 10906
serve "$WORK/b.img" 10907
serve "$WORK/c.img" 10908
"$DSTFS" mount "$WORK/mnt" --state "$WORK/state" --name live \
  --node nbd://127.0.0.1:10906 --node nbd://127.0.0.1:10907
filesystem
dd if=/dev/urandom of="$WORK/data/file" bs=1M count=200 status=none conv=fsync
before=$(sha256sum < "$WORK/data/file")
"$DSTFS" suspend "$WORK/mnt" n-0 && cat "$WORK/mnt/n-0/state" && "$DSTFS" resume "$WORK/mnt" n-0
"$DSTFS" migrate "$WORK/mnt" n-0 nbd://127.0.0.1:10908     # progress until done
cat "$WORK/mnt/n-0/type"
echo 3 > /proc/sys/vm/drop_caches
[ "$(sha256sum < "$WORK/data/file")" = "$before" ] && echo "data intact after migration"
