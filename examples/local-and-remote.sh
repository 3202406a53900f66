#!/usr/bin/env bash
# A local disk (a file here; a block device works the same) plus a remote node.
. "$(dirname "$0")/common.sh"
truncate -s 256M "$WORK/local.img"
serve "$WORK/remote.img" 10903
"$DSTFS" mount "$WORK/mnt" --state "$WORK/state" --name mixed \
  --node "$WORK/local.img" --node nbd://127.0.0.1:10903
cat "$WORK/mnt"/n-*/type          # L: /path and R: host:port, as in the seed
filesystem
cp -r "$ROOT/dstfs" "$WORK/data/" && sync
"$DSTFS" status "$WORK/mnt"
