//! The guest half of the Linux-under-QEMU block tests: busybox scripts that drive
//! `/dev/vda` through Linux's virtio-blk driver and print one result line
//! (`INTEROP-RESULT key=value ...`) plus one `INTEROP-FILE <sha256> <path>` line per
//! file they vouch for, which the host then checks against the image.

/// Prefix of the guest's result line.
pub const RESULT_PREFIX: &str = "INTEROP-RESULT ";
/// Prefix of the guest's per-file checksum lines.
pub const FILE_PREFIX: &str = "INTEROP-FILE ";

/// Read-write workload. Formats the disk with ext2 (busybox `mke2fs`), leaving the last
/// 8 MiB raw; writes a tree of files of mixed sizes from every CPU at once (each writer
/// pinned to its CPU, so blk-mq submits on that CPU's hardware queue), some with
/// O_DIRECT; `sync -f` (FLUSH); remounts with caches dropped and checks every
/// checksum; writes and reads back 6 MiB of the raw tail with O_DIRECT and discards
/// the 2 MiB after it (DISCARD); deletes files and runs `fstrim` (DISCARD through the
/// filesystem); checks every remaining file again and prints its checksum.
///
/// Result fields: `files` written, `bad` checksum failures after the first remount,
/// `bad_after_trim`, `raw` (`ok`/`bad`), `raw_offset_mib`, `trimmed` (bytes fstrim
/// reported), `io_errors` (kernel "I/O error" lines), `queues` (hardware queues the
/// driver set up), `irqs` (interrupts each queue's MSI-X vector took, comma separated:
/// proof that every queue completed requests), `ro`.
pub const READ_WRITE_SCRIPT: &str = r#"#!/bin/sh
R="INTEROP-RESULT"
fail() { echo "$R status=fail step=$1"; dmesg | tail -20; exit 1; }
if [ "$1" = writer ]; then
  c=$2
  for n in 1 2 3 4 5 6 7 8; do head -c $((n * 997)) /dev/urandom > /mnt/small/c$c-$n || exit 1; done
  for s in 0 1 511 512 4095 4096 4097 65536 131071; do
    head -c $s /dev/urandom > /mnt/mixed/deep/er/c$c-$s || exit 1
  done
  head -c 1048579 /dev/urandom > /mnt/mixed/c$c-1m || exit 1
  dd if=/dev/urandom of=/mnt/big/c$c-direct bs=65536 count=32 oflag=direct 2>/dev/null || exit 1
  head -c 3145728 /dev/urandom > /mnt/big/c$c-3m || exit 1
  exit 0
fi
DEV=/dev/vda
i=0; while [ ! -b $DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b $DEV ] || fail find-disk
QUEUES=$(ls /sys/block/vda/mq | wc -l)
RO=$(cat /sys/block/vda/ro)
SECTORS=$(cat /sys/block/vda/size)
FS_KB=$((SECTORS / 2 - 8192))
RAW_MIB=$((FS_KB / 1024))
mke2fs -F -b 4096 $DEV $FS_KB > /tmp/mkfs.log 2>&1 || fail mkfs
mount -t ext2 $DEV /mnt || fail mount
mkdir -p /mnt/small /mnt/mixed/deep/er /mnt/big || fail mkdir
PIDS=""
c=0
while [ $c -lt $(nproc) ]; do
  taskset -c $c sh /guest-script writer $c &
  PIDS="$PIDS $!"
  c=$((c + 1))
done
for p in $PIDS; do wait $p || fail write; done
sync -f /mnt || fail syncfs
(cd /mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums || fail checksum
FILES=$(wc -l < /tmp/sums)
umount /mnt || fail umount
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 $DEV /mnt || fail remount
(cd /mnt && sha256sum -c /tmp/sums) > /tmp/check 2>&1
BAD=$(grep -vc ': OK$' /tmp/check)
umount /mnt || fail umount-raw
head -c 8388608 /dev/urandom > /tmp/raw
dd if=/tmp/raw of=$DEV bs=1048576 seek=$RAW_MIB oflag=direct conv=fsync 2>/dev/null || fail raw-write
WANT=$(head -c 6291456 /tmp/raw | sha256sum | cut -d' ' -f1)
echo 3 > /proc/sys/vm/drop_caches
GOT=$(dd if=$DEV bs=1048576 skip=$RAW_MIB count=6 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
RAW=bad; [ "$WANT" = "$GOT" ] && RAW=ok
echo "INTEROP-FILE $WANT raw:$RAW_MIB:6"
blkdiscard -o $(((RAW_MIB + 6) * 1048576)) -l 2097152 $DEV || fail blkdiscard
mount -t ext2 $DEV /mnt || fail mount-trim
rm /mnt/big/c0-3m /mnt/small/c0-1 || fail rm
sync -f /mnt || fail syncfs2
TRIMMED=$(fstrim -v /mnt | sed -n 's/.* \([0-9][0-9]*\) bytes.*/\1/p')
grep -v -e '/big/c0-3m$' -e '/small/c0-1$' /tmp/sums > /tmp/sums2
umount /mnt || fail umount2
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 $DEV /mnt || fail remount2
(cd /mnt && sha256sum -c /tmp/sums2) > /tmp/check2 2>&1
BAD2=$(grep -vc ': OK$' /tmp/check2)
sed 's/^/INTEROP-FILE /' /tmp/sums2
umount /mnt || fail umount3
IRQS=$(grep 'virtio0-req\.' /proc/interrupts | awk -v n=$(nproc) '{ s = 0; for (i = 2; i <= n + 1; i++) s += $i; printf "%s%d", (NR > 1 ? "," : ""), s }')
IOERR=$(dmesg | grep -c 'I/O error')
echo "$R status=ok files=$FILES bad=$BAD bad_after_trim=$BAD2 raw=$RAW raw_offset_mib=$RAW_MIB trimmed=${TRIMMED:-none} io_errors=$IOERR queues=$QUEUES irqs=$IRQS ro=$RO"
"#;

/// Read-only workload against a disk the host formatted: the guest must see a
/// read-only disk, read every file (printing its checksum), and fail cleanly when it
/// tries to write (a file on the read-only mount, a read-write remount, a raw O_DIRECT
/// write to the device).
///
/// Result fields: `ro` (`/sys/block/vda/ro`), `files`, `fs_write`, `remount_rw`,
/// `raw_write` (each `refused` or `allowed`), `io_errors`.
pub const READ_ONLY_SCRIPT: &str = r#"#!/bin/sh
R="INTEROP-RESULT"
fail() { echo "$R status=fail step=$1"; dmesg | tail -20; exit 1; }
DEV=/dev/vda
i=0; while [ ! -b $DEV ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b $DEV ] || fail find-disk
RO=$(cat /sys/block/vda/ro)
mount -t ext2 -o ro $DEV /mnt || fail mount
(cd /mnt && find . -type f | sort | xargs sha256sum) > /tmp/sums || fail checksum
FILES=$(wc -l < /tmp/sums)
sed 's/^/INTEROP-FILE /' /tmp/sums
FS_WRITE=refused; (echo x > /mnt/new-file) 2>/dev/null && FS_WRITE=allowed
REMOUNT=refused; mount -o remount,rw /mnt 2>/dev/null && REMOUNT=allowed
umount /mnt || fail umount
RAW_WRITE=refused
dd if=/dev/zero of=$DEV bs=4096 count=1 oflag=direct conv=fsync 2>/dev/null && RAW_WRITE=allowed
IOERR=$(dmesg | grep -c 'I/O error')
echo "$R status=ok ro=$RO files=$FILES fs_write=$FS_WRITE remount_rw=$REMOUNT raw_write=$RAW_WRITE io_errors=$IOERR"
"#;

/// One `INTEROP-FILE` line: a file inside the guest's filesystem, or a raw range of the
/// disk (`raw:<offset MiB>:<length MiB>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestClaim {
    /// `path` (absolute inside the filesystem) has SHA-256 `sha256`.
    File {
        /// Absolute path inside the filesystem.
        path: String,
        /// Lower-case hex SHA-256.
        sha256: String,
    },
    /// The disk bytes `[offset_mib, offset_mib + len_mib)` MiB have SHA-256 `sha256`.
    Raw {
        /// Start in MiB.
        offset_mib: u64,
        /// Length in MiB.
        len_mib: u64,
        /// Lower-case hex SHA-256.
        sha256: String,
    },
}

/// Parses the guest's `INTEROP-FILE <sha256> <path>` lines (busybox `sha256sum` output
/// with paths relative to the mount point, or `raw:<offset>:<len>`).
pub fn parse_claims<S: AsRef<str>>(lines: &[S]) -> Vec<GuestClaim> {
    lines
        .iter()
        .filter_map(|line| {
            let mut parts = line.as_ref().split_whitespace();
            let sha256 = parts.next()?.to_string();
            let what = parts.next()?;
            if let Some(raw) = what.strip_prefix("raw:") {
                let (offset, len) = raw.split_once(':')?;
                return Some(GuestClaim::Raw {
                    offset_mib: offset.parse().ok()?,
                    len_mib: len.parse().ok()?,
                    sha256,
                });
            }
            let path = format!("/{}", what.trim_start_matches("./"));
            Some(GuestClaim::File { path, sha256 })
        })
        .collect()
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_parsed() {
        let claims = parse_claims(&["ab  ./small/c0-2", "cd raw:56:6", "garbage", "ef raw:x:6"]);
        assert_eq!(
            claims,
            [
                GuestClaim::File {
                    path: "/small/c0-2".into(),
                    sha256: "ab".into()
                },
                GuestClaim::Raw {
                    offset_mib: 56,
                    len_mib: 6,
                    sha256: "cd".into()
                },
            ]
        );
    }

    #[test]
    fn sha256_matches_the_known_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
