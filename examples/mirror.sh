#!/usr/bin/env bash
# A mirror of two replicas under ext4: one replica's server dies and comes
# back (resync of what it missed), then a replica is replaced by a new server
# (full sync, zeroes not sent), then the replicas are verified.
. "$(dirname "$0")/common.sh"
serve "$WORK/a.img" 10916
serve "$WORK/b.img" 10917
"$DSTFS" mount "$WORK/mnt" --state "$WORK/state" --name mirror --alg mirror \
  --node nbd://127.0.0.1:10916 --node nbd://127.0.0.1:10917
wait_state() {  # wait_state NODE STATE: until the replica shows that state
  for _ in $(seq 600); do [ "$(cat "$WORK/mnt/$1/state")" = "$2" ] && return; sleep 0.1; done
  echo "$1 never became $2 (it is $(cat "$WORK/mnt/$1/state"))" >&2; exit 1
}
wait_state n-1 in_sync
filesystem
dd if=/dev/urandom of="$WORK/data/one" bs=1M count=50 status=none conv=fsync

echo "--- the server of n-1 dies; writes go on, degraded"
kill -9 "${PIDS[1]}"; wait "${PIDS[1]}" 2>/dev/null || true
dd if=/dev/urandom of="$WORK/data/two" bs=1M count=20 status=none conv=fsync
echo "n-1: $(cat "$WORK/mnt/n-1/state"), dirty regions: $(cat "$WORK/mnt/n-1/dirty"), degraded: $(cat "$WORK/mnt/degraded")"

echo "--- it comes back and resyncs only what it missed"
serve "$WORK/b.img" 10917
wait_state n-1 in_sync
grep -E "resync_regions|resync_bytes" "$WORK/mnt/stats"

echo "--- n-0 is replaced by a new, empty server (full sync from n-1)"
serve "$WORK/c.img" 10918
echo nbd://127.0.0.1:10918 > "$WORK/mnt/n-0/migrate"
wait_state n-0 in_sync
"$DSTFS" status "$WORK/mnt"

echo "--- verify: compare the replicas"
sync
"$DSTFS" verify "$WORK/mnt"
umount "$WORK/data"; losetup -d "$LOOP"
"$DSTFS" umount "$WORK/mnt"
cmp "$WORK/b.img" "$WORK/c.img" && echo "replicas identical"
