//! The control API's HTTP reader and router: any bytes a client sends get an answer
//! (or a closed connection when they end early), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plexvm::api::{answer_raw_request, ControlError, VmController};
use plexvm_protocol::api::{RequestedState, VmInfo, VmState};

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

fuzz_target!(|data: &[u8]| {
    if let Some(status) = answer_raw_request(data, &Vm) {
        assert!((100..600).contains(&status), "status {status}");
    }
});
