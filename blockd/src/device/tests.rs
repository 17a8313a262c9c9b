//! The behaviour suite every [`BlockDevice`] backend must pass, written once and run
//! against the memory device, the sync and io_uring engines on a sparse file, and both
//! engines on a real loop device.
//!
//! Layout of a device under test (at least [`MIN_SIZE`] bytes):
//!
//! ```text
//!   0 ─ 2 MiB     random aligned/unaligned batches checked against a model
//!   2 ─ 3 MiB     explicit mixed batches, punch
//!   3 MiB ─ +64K  concurrent writers inside one 4 KiB block
//!   last blocks   out-of-range checks
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::file::Target;
use super::mem::MemDevice;
use super::sync::SyncDevice;
use super::uring::UringDevice;
use super::{
    open_path, AlignedBuf, BlockDevice, DeviceError, EngineChoice, IoEngine, IoOp, IO_ALIGN,
};

/// Smallest device the suite runs on.
pub(crate) const MIN_SIZE: u64 = 4 << 20;

const MODEL_REGION: usize = 2 << 20;
const BATCH_REGION: u64 = 2 << 20;
const CONCURRENT_REGION: u64 = 3 << 20;

/// Runs every behaviour check against `dev`. `fresh_reads_zero`: the device was never
/// written, and reads of never-written space must return zeros (files, memory, a loop
/// device over a new sparse file).
pub(crate) fn run_suite(dev: &dyn BlockDevice, fresh_reads_zero: bool) {
    assert!(
        dev.size() >= MIN_SIZE,
        "the suite needs a device of at least {MIN_SIZE} bytes"
    );
    if fresh_reads_zero {
        unwritten_space_reads_zero(dev);
    }
    out_of_range_is_refused_without_side_effects(dev);
    random_batches_match_a_model(dev, fresh_reads_zero);
    mixed_batch_runs_in_order(dev);
    punch_reads_back_zeros_and_spares_neighbours(dev);
    flush_works(dev);
    concurrent_writers_in_one_block_all_land(dev);
}

/// Whether opening io_uring failed because this environment forbids it (old kernel,
/// seccomp, `kernel.io_uring_disabled`), as opposed to a bug.
pub(crate) fn uring_unavailable(err: &DeviceError) -> bool {
    match err {
        DeviceError::Open { source, .. } => matches!(
            source.raw_os_error(),
            Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EACCES)
        ),
        _ => false,
    }
}

fn read(dev: &dyn BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    dev.read_at(offset, &mut buf)
        .unwrap_or_else(|err| panic!("read of {len} bytes at {offset} failed: {err:?}"));
    buf
}

fn unwritten_space_reads_zero(dev: &dyn BlockDevice) {
    let size = dev.size();
    for (offset, len) in [
        (0, 4096),
        (12345, 777),
        (size / 2, 65536),
        (size - 4096, 4096),
        (size - 3, 3),
    ] {
        assert!(
            read(dev, offset, len).iter().all(|&b| b == 0),
            "unwritten {len} bytes at {offset}"
        );
    }
    let mut aligned = AlignedBuf::zeroed(8192);
    aligned.fill(0x55);
    dev.read_at(size - 8192, &mut aligned).unwrap();
    assert!(aligned.iter().all(|&b| b == 0));
}

fn assert_out_of_range(result: super::Result<()>, what: &str) {
    match result {
        Err(err @ DeviceError::OutOfRange { .. }) => assert_eq!(err.errno(), libc::EINVAL),
        other => panic!("{what}: expected OutOfRange, got {other:?}"),
    }
}

fn out_of_range_is_refused_without_side_effects(dev: &dyn BlockDevice) {
    let size = dev.size();
    let tail = size - 16;
    dev.write_at(tail, &[0x77; 16]).unwrap();

    assert_out_of_range(dev.read_at(size, &mut [0u8; 1]), "read at the end");
    assert_out_of_range(dev.write_at(size - 1, &[1, 2]), "write across the end");
    assert_out_of_range(dev.write_at(size + 4096, &[]), "empty write past the end");
    // offset + len overflows u64: must not wrap around to the start of the device.
    assert_out_of_range(dev.read_at(u64::MAX, &mut [0u8; 1]), "read at u64::MAX");
    assert_out_of_range(
        dev.write_at(u64::MAX - 1, &[9; 4096]),
        "write wrapping around",
    );
    let mut aligned = AlignedBuf::zeroed(IO_ALIGN);
    assert_out_of_range(dev.read_at(size, &mut aligned), "aligned read at the end");
    assert_out_of_range(dev.punch(size - 8, 16), "punch across the end");
    assert_out_of_range(dev.punch(u64::MAX, 1), "punch wrapping around");

    // A batch with one bad op changes nothing, not even its valid ops.
    let mut first = [0u8; 8];
    let mut ops = [
        IoOp::Write {
            offset: tail,
            buf: &[0x11; 8],
        },
        IoOp::Read {
            offset: 0,
            buf: &mut first,
        },
        IoOp::Write {
            offset: size - 4,
            buf: &[0x22; 8],
        },
    ];
    assert_out_of_range(dev.submit(&mut ops), "batch with one op across the end");

    // Empty I/O at the very end is in range.
    dev.read_at(size, &mut []).unwrap();
    dev.write_at(size, &[]).unwrap();
    dev.punch(size, 0).unwrap();

    assert_eq!(
        read(dev, tail, 16),
        vec![0x77; 16],
        "refused I/O changed the device"
    );
    assert_ne!(
        read(dev, 0, 4094),
        vec![9; 4094],
        "a wrapped-around write reached offset 0"
    );
}

/// One op of a generated batch, owning its buffer.
struct PlannedOp {
    write: bool,
    offset: u64,
    buf: AlignedBuf,
    /// Start of the op's bytes in `buf` (non-zero to misalign the address).
    start: usize,
    len: usize,
}

fn plan_op(rng: &mut StdRng, region: usize) -> PlannedOp {
    let align = IO_ALIGN;
    let fully_aligned = rng.gen_bool(0.35);
    let len = match rng.gen_range(0..10) {
        _ if fully_aligned => align * rng.gen_range(1..=32),
        0 => rng.gen_range(1..=3),
        1..=6 => rng.gen_range(1..=20_000),
        7 => align * rng.gen_range(1..=16),
        _ => rng.gen_range(1..=300_000),
    };
    let offset = if fully_aligned || rng.gen_bool(0.3) {
        align * rng.gen_range(0..(region - len) / align)
    } else {
        rng.gen_range(0..=region - len)
    };
    let start = if fully_aligned || rng.gen_bool(0.5) {
        0
    } else {
        rng.gen_range(1..align)
    };
    let mut buf = AlignedBuf::zeroed(start + len);
    let write = rng.gen_bool(0.55);
    if write {
        rng.fill(&mut buf[start..]);
    } else {
        buf.fill(0xA5);
    }
    PlannedOp {
        write,
        offset: offset as u64,
        buf,
        start,
        len,
    }
}

/// Batches of 1-8 random reads and writes — aligned or not in offset, length and buffer
/// address, any size up to 300 KB — each checked against a model that applies the batch in
/// order.
fn random_batches_match_a_model(dev: &dyn BlockDevice, fresh: bool) {
    let mut model = vec![0u8; MODEL_REGION];
    if !fresh {
        dev.write_at(0, &model).unwrap();
    }
    let mut rng = StdRng::seed_from_u64(0x000B_10CD);
    for round in 0..150 {
        let count = rng.gen_range(1..=8);
        let mut planned: Vec<PlannedOp> = (0..count)
            .map(|_| plan_op(&mut rng, MODEL_REGION))
            .collect();
        let mut expected: Vec<Option<Vec<u8>>> = Vec::with_capacity(count);
        for op in &planned {
            let range = op.offset as usize..op.offset as usize + op.len;
            if op.write {
                model[range].copy_from_slice(&op.buf[op.start..]);
                expected.push(None);
            } else {
                expected.push(Some(model[range].to_vec()));
            }
        }
        let mut ops: Vec<IoOp<'_>> = planned
            .iter_mut()
            .map(|op| {
                if op.write {
                    IoOp::Write {
                        offset: op.offset,
                        buf: &op.buf[op.start..],
                    }
                } else {
                    IoOp::Read {
                        offset: op.offset,
                        buf: &mut op.buf[op.start..],
                    }
                }
            })
            .collect();
        dev.submit(&mut ops)
            .unwrap_or_else(|err| panic!("round {round}: {err:?}"));
        drop(ops);
        for (i, (op, expected)) in planned.iter().zip(&expected).enumerate() {
            if let Some(expected) = expected {
                assert!(
                    &op.buf[op.start..] == expected.as_slice(),
                    "round {round} op {i}: read of {} bytes at {} (address offset {}) differs",
                    op.len,
                    op.offset,
                    op.start
                );
            }
        }
        if round % 50 == 49 {
            dev.flush().unwrap();
        }
    }
    assert!(
        read(dev, 0, MODEL_REGION) == model,
        "final contents differ from the model"
    );
}

/// An explicit batch: writes and reads of the same bytes behave as if run in order.
fn mixed_batch_runs_in_order(dev: &dyn BlockDevice) {
    let base = BATCH_REGION;
    let mut aligned = AlignedBuf::zeroed(8192);
    aligned.fill(0x10);
    let mut read_before = vec![0xEE; 100];
    let mut read_after = vec![0u8; 8192 + 200];
    let mut read_aligned = AlignedBuf::zeroed(8192);
    let mut ops = [
        IoOp::Write {
            offset: base,
            buf: &aligned,
        },
        IoOp::Read {
            offset: base + 100,
            buf: &mut read_before,
        },
        IoOp::Write {
            offset: base + 8190,
            buf: &[0x20; 10],
        },
        IoOp::Write {
            offset: base + 50,
            buf: &[0x30; 7],
        },
        IoOp::Read {
            offset: base,
            buf: &mut read_after,
        },
        IoOp::Read {
            offset: base + 8192,
            buf: &mut read_aligned,
        },
    ];
    dev.submit(&mut ops).unwrap();
    assert_eq!(read_before, vec![0x10; 100]);
    let mut expected = vec![0x10; 8192];
    expected.resize(8192 + 200, 0);
    expected[8190..8200].fill(0x20);
    expected[50..57].fill(0x30);
    assert_eq!(read_after, expected);
    assert_eq!(&read_aligned[..8], &[0x20; 8]);
    assert!(read_aligned[8..].iter().all(|&b| b == 0));
}

fn punch_reads_back_zeros_and_spares_neighbours(dev: &dyn BlockDevice) {
    let base = BATCH_REGION + (256 << 10);
    let len = 512 << 10;
    let mut model = vec![0xABu8; len];
    dev.write_at(base, &model).unwrap();
    let punches: [(u64, u64); 4] = [
        (64 << 10, 64 << 10),
        (5, 1000),
        ((130 << 10) + 17, 9000),
        (300 << 10, 0),
    ];
    for &(offset, plen) in &punches {
        dev.punch(base + offset, plen).unwrap();
        model[offset as usize..(offset + plen) as usize].fill(0);
    }
    let back = read(dev, base, len);
    if dev.punch_zeroes() {
        assert!(
            back == model,
            "punched ranges must read back as zeros, the rest unchanged"
        );
    } else {
        // Discard is only a hint, but it must never touch bytes outside the range.
        for (i, (&got, &want)) in back.iter().zip(&model).enumerate() {
            let punched = punches
                .iter()
                .any(|&(offset, plen)| (offset..offset + plen).contains(&(i as u64)));
            assert!(
                punched || got == want,
                "byte {i} outside every punched range changed"
            );
        }
    }
    // Punched space is writable again.
    dev.write_at(base + 5, &[1, 2, 3]).unwrap();
    assert_eq!(read(dev, base + 4, 5), vec![back[4], 1, 2, 3, back[8]]);
}

fn flush_works(dev: &dyn BlockDevice) {
    dev.flush().unwrap();
    dev.write_at(BATCH_REGION + (900 << 10), b"made durable")
        .unwrap();
    dev.flush().unwrap();
    dev.flush().unwrap();
    assert_eq!(read(dev, BATCH_REGION + (900 << 10), 12), b"made durable");
}

/// Writers of disjoint ranges inside one 4 KiB block, next to a writer of whole aligned
/// blocks: every write must land (a read-modify-write of the block would lose some).
fn concurrent_writers_in_one_block_all_land(dev: &dyn BlockDevice) {
    const WRITERS: u64 = 16;
    const SLICE: u64 = IO_ALIGN as u64 / WRITERS;
    const ROUNDS: u8 = 100;
    let block = CONCURRENT_REGION;
    let neighbour = block + IO_ALIGN as u64;
    std::thread::scope(|s| {
        for t in 0..WRITERS {
            s.spawn(move || {
                for round in 0..=ROUNDS {
                    let value = if round == ROUNDS {
                        t as u8 + 1
                    } else {
                        round ^ 0x80
                    };
                    // Odd lengths and offsets inside the slice keep every write unaligned.
                    dev.write_at(block + t * SLICE, &[value; SLICE as usize])
                        .unwrap();
                    dev.write_at(block + t * SLICE + 3, &[value; 5]).unwrap();
                }
            });
        }
        s.spawn(move || {
            let mut buf = AlignedBuf::zeroed(IO_ALIGN);
            for round in 0..=ROUNDS {
                buf.fill(round);
                dev.write_at(neighbour, &buf).unwrap();
            }
        });
    });
    let back = read(dev, block, 2 * IO_ALIGN);
    for t in 0..WRITERS as usize {
        let slice = &back[t * SLICE as usize..(t + 1) * SLICE as usize];
        assert!(
            slice.iter().all(|&b| b == t as u8 + 1),
            "writer {t} lost its write: {slice:?}"
        );
    }
    assert!(
        back[IO_ALIGN..].iter().all(|&b| b == ROUNDS),
        "aligned neighbour block lost its write"
    );
}

fn sparse_target(dir: &Path, size: u64) -> Target {
    Target::open(&dir.join("data"), Some(size)).unwrap()
}

#[test]
fn mem_behaviour() {
    let dev = MemDevice::new(MIN_SIZE);
    assert_eq!(dev.engine(), IoEngine::Memory);
    run_suite(&dev, true);
}

#[test]
fn sync_file_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let dev = SyncDevice::new(sparse_target(dir.path(), MIN_SIZE));
    assert_eq!(dev.engine(), IoEngine::Sync);
    run_suite(&dev, true);
}

#[test]
fn uring_file_behaviour() {
    let dir = tempfile::tempdir().unwrap();
    let dev = match UringDevice::new(sparse_target(dir.path(), MIN_SIZE)) {
        Ok(dev) => dev,
        Err(err) if uring_unavailable(&err) => {
            eprintln!("skipping: io_uring is not available here: {err}");
            return;
        }
        Err(err) => panic!("io_uring setup failed: {err:?}"),
    };
    assert_eq!(dev.engine(), IoEngine::Uring);
    run_suite(&dev, true);
}

#[test]
fn open_path_picks_the_requested_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let sync = open_path(&path, Some(1 << 20), EngineChoice::Sync).unwrap();
    assert_eq!(sync.engine(), IoEngine::Sync);
    assert_eq!(sync.size(), 1 << 20);
    let auto = open_path(&path, None, EngineChoice::Auto).unwrap();
    match open_path(&path, None, EngineChoice::Uring) {
        Ok(uring) => {
            assert_eq!(uring.engine(), IoEngine::Uring);
            assert_eq!(auto.engine(), IoEngine::Uring);
        }
        Err(err) if uring_unavailable(&err) => assert_eq!(auto.engine(), IoEngine::Sync),
        Err(err) => panic!("io_uring setup failed: {err:?}"),
    }
    // Both engines see the same file.
    sync.write_at(4000, b"shared").unwrap();
    let mut back = [0u8; 6];
    auto.read_at(4000, &mut back).unwrap();
    assert_eq!(&back, b"shared");
}

/// A loop device over a new sparse file, detached on drop (also when a test fails).
struct LoopDevice {
    device: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    fn attach(size: u64) -> Result<LoopDevice, String> {
        let dir = tempfile::tempdir().map_err(|err| format!("no temporary directory: {err}"))?;
        let backing = dir.path().join("backing");
        std::fs::File::create(&backing)
            .and_then(|file| file.set_len(size))
            .map_err(|err| format!("cannot create the backing file: {err}"))?;
        let output = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(&backing)
            .output()
            .map_err(|err| format!("cannot run losetup: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "losetup failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let device = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if !device.starts_with("/dev") {
            return Err(format!("losetup printed an unexpected device {device:?}"));
        }
        Ok(LoopDevice { device, _dir: dir })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.device).status() {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("losetup -d {} failed: {status}", self.device.display()),
            Err(err) => eprintln!("cannot run losetup -d {}: {err}", self.device.display()),
        }
    }
}

fn with_loop_device(test: &str, run: impl FnOnce(Target)) {
    let device = match LoopDevice::attach(8 << 20) {
        Ok(device) => device,
        Err(reason) => {
            eprintln!("{test}: skipping: {reason}");
            return;
        }
    };
    let target = Target::open(&device.device, None).unwrap();
    assert!(target.is_block_device());
    assert_eq!(target.size(), 8 << 20);
    assert!(!target.punch_zeroes());
    run(target);
}

#[test]
fn loop_sync_behaviour() {
    with_loop_device("loop_sync_behaviour", |target| {
        let dev = SyncDevice::new(target);
        run_suite(&dev, true);
    });
}

#[test]
fn loop_uring_behaviour() {
    with_loop_device("loop_uring_behaviour", |target| {
        let dev = match UringDevice::new(target) {
            Ok(dev) => dev,
            Err(err) if uring_unavailable(&err) => {
                eprintln!("loop_uring_behaviour: skipping: io_uring is not available here: {err}");
                return;
            }
            Err(err) => panic!("io_uring setup failed: {err:?}"),
        };
        run_suite(&dev, true);
    });
}
