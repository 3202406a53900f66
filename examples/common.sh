# Shared by the example scripts: where dstfs is, and a cleanup trap.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DSTFS="$ROOT/.venv/bin/dstfs"
[ -x "$DSTFS" ] || { echo "run 'bash .ci/setup' first" >&2; exit 1; }
WORK=$(mktemp -d /tmp/dstfs-example.XXXXXX)
PIDS=()
cleanup() {
  set +e
  mountpoint -q "$WORK/data" && umount "$WORK/data"
  for l in $(losetup -j "$WORK/mnt/disk.img" -O NAME -n 2>/dev/null); do losetup -d "$l"; done
  mountpoint -q "$WORK/mnt" && "$DSTFS" umount "$WORK/mnt"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/mnt" "$WORK/data"
serve() {  # serve FILE PORT: a node server in the background
  "$DSTFS" serve "$1" --size "${3:-256M}" --listen "127.0.0.1:$2" & PIDS+=($!)
  for _ in $(seq 50); do nbdinfo --size "nbd://127.0.0.1:$2" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "node on port $2 did not start" >&2; exit 1
}
filesystem() {  # losetup + mkfs.ext4 + mount on $WORK/data
  LOOP=$(losetup -f --show --direct-io=on "$WORK/mnt/disk.img")
  mkfs.ext4 -q "$LOOP" && mount "$LOOP" "$WORK/data"
}
