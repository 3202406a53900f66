#!/usr/bin/env bash
# Grow a running array: write a node URI to add_node; disk.img grows.
. "$(dirname "$0")/common.sh"
serve "$WORK/a.img" 10904
serve "$WORK/b.img" 10905
"$DSTFS" mount "$WORK/mnt" --state "$WORK/state" --name growing --node nbd://127.0.0.1:10904
echo "before: $(cat "$WORK/mnt/size") sectors; $(cat "$WORK/mnt/nodes")"
echo nbd://127.0.0.1:10905 > "$WORK/mnt/add_node"
echo "after:  $(cat "$WORK/mnt/size") sectors; $(cat "$WORK/mnt/nodes")"
echo nbd://127.0.0.1:1 > "$WORK/mnt/add_node" || echo "(an unreachable node is refused, nothing changed)"
