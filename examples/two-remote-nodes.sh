#!/usr/bin/env bash
# The seed's first scenario: two remote nodes joined linearly, ext4 on top.
. "$(dirname "$0")/common.sh"
serve "$WORK/a.img" 10901
serve "$WORK/b.img" 10902
"$DSTFS" mount "$WORK/mnt" --state "$WORK/state" --name two-remote \
  --node nbd://127.0.0.1:10901 --node nbd://127.0.0.1:10902
cat "$WORK/mnt/nodes"
filesystem
dd if=/dev/urandom of="$WORK/data/file" bs=1M count=300 status=none conv=fsync
sha256sum "$WORK/data/file"
"$DSTFS" status "$WORK/mnt"
