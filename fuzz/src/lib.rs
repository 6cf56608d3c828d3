//! The fuzz targets' bodies, one function per target (see README.md). The
//! `fuzz_targets/` binaries hand them libFuzzer's inputs (`cargo +nightly fuzz`); the
//! corpus test (`tests/corpus.rs`) hands them the checked-in corpus and derived
//! inputs on stable, so that CI runs every target without nightly.

use std::io::Write;
use std::sync::OnceLock;

use plexvm::api::{answer_raw_request, ControlError, VmController};
use plexvm_blk::chain;
use plexvm_blk::disk::{Disk, DiskOptions};
use plexvm_blk::request::BlockDevice;
use plexvm_protocol::api::{RequestedState, VmInfo, VmState};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

mod backend_reply;

pub use backend_reply::backend_reply;

/// The VM spec parser (`plexvm run vm.toml`): any text gets a spec or a one-line
/// error, never a panic.
pub fn spec(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Err(e) = plexvm_protocol::VmSpec::parse(&text, "fuzz.toml") {
        // The error is meant for one stderr line.
        assert!(!e.to_string().is_empty());
    }
}

/// A VM that answers every API request.
struct Vm;

impl VmController for Vm {
    fn info(&self) -> VmInfo {
        VmInfo {
            name: "fuzz".into(),
            state: VmState::Running,
            vcpus: 1,
            memory_mib: 64,
            pid: 1,
            devices: Vec::new(),
        }
    }

    fn set_state(&self, requested: RequestedState) -> Result<VmInfo, ControlError> {
        match requested {
            RequestedState::Paused => Ok(self.info()),
            _ => Err(ControlError::Conflict("not now".into())),
        }
    }
}

/// The control API's HTTP reader and router: any bytes a client sends get an answer
/// (or a closed connection when they end early), never a panic.
pub fn api_request(data: &[u8]) {
    if let Some(status) = answer_raw_request(data, &Vm) {
        assert!((100..600).contains(&status), "status {status}");
    }
}

const MEM_SIZE: usize = 64 * 1024;
const SECTORS: usize = 16;

fn device() -> &'static BlockDevice {
    static DEVICE: OnceLock<(tempfile::NamedTempFile, BlockDevice)> = OnceLock::new();
    &DEVICE
        .get_or_init(|| {
            let mut image = tempfile::NamedTempFile::new().expect("temp image");
            image
                .write_all(&vec![0xa5; SECTORS * 512])
                .expect("image data");
            let options = DiskOptions {
                readonly: false,
                direct: false,
            };
            let disk = Disk::open(image.path(), options).expect("image opens");
            (image, BlockDevice::new(disk, *b"fuzz-serial-00000000"))
        })
        .1
}

/// plexvm-blk's request path, fed the way a guest feeds it: the input becomes guest
/// memory (descriptor table at 0, buffers anywhere), a head index and a queue size;
/// the chain is read with the backend's own chain reader and executed against a small
/// image. Whatever the chain says, the backend must not panic, must not touch memory
/// outside guest RAM (ASan), and must report a used length no larger than the
/// chain's device-writable bytes.
pub fn blk_request(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let queue_size = u16::from(data[0] % 64) + 1;
    let head = u16::from(data[1]) % queue_size;
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let body = &data[2..];
    let len = body.len().min(MEM_SIZE);
    mem.write_slice(&body[..len], GuestAddress(0))
        .expect("within guest memory");
    let descriptors = chain::descriptors(&mem, GuestAddress(0), queue_size, head);
    let writable: u64 = descriptors
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    let completion = device().process(&mem, descriptors);
    assert!(u64::from(completion.used_len) <= writable);
}
