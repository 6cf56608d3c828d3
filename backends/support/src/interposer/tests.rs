use super::*;
use std::sync::atomic::AtomicBool;

#[derive(Default)]
struct Recorder {
    set: AtomicBool,
}

impl InflightHandler for Recorder {
    fn get_inflight_fd(&self, q: u16, size: u16) -> io::Result<(File, u64)> {
        let f = tempfile::tempfile()?;
        f.set_len(u64::from(q) * u64::from(size))?;
        Ok((f, u64::from(q) * u64::from(size)))
    }
    fn set_inflight_fd(&self, _file: File, g: InflightGeometry) -> io::Result<()> {
        assert_eq!(g.num_queues, 2);
        self.set.store(true, Ordering::SeqCst);
        Ok(())
    }
}

fn request(code: u32, flags: u32, payload: Vec<u8>, files: Vec<File>) -> Message {
    Message {
        request: code,
        flags: FLAG_VERSION | flags,
        payload,
        files,
    }
}

/// A connection through an interposer with `hook`: (frontend end, daemon end, guard).
fn connect(hook: impl RequestHook) -> (UnixStream, UnixStream, Interposer) {
    let (core, frontend) = UnixStream::pair().unwrap();
    let (interposer, listener) = Interposer::start(frontend, hook).unwrap();
    let (daemon, _) = listener.accept().unwrap();
    (core, daemon, interposer)
}

#[test]
fn inflight_messages_are_answered_and_others_forwarded_with_fds() {
    let handler = Arc::new(Recorder::default());
    let (core, daemon, interposer) = connect(InflightMessages(handler.clone()));
    let g = InflightGeometry {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: 8,
    };
    let get = request(GET_INFLIGHT_FD, 0, g.bytes().to_vec(), vec![]);
    send_message(&core, &get).unwrap();
    let reply = recv_message(&core).unwrap().unwrap();
    assert_eq!(reply.request, GET_INFLIGHT_FD);
    assert_eq!(reply.flags, FLAG_VERSION | FLAG_REPLY);
    let size = InflightGeometry::parse(&reply.payload).unwrap().mmap_size;
    assert_eq!(size, 16);
    assert_eq!(reply.files.len(), 1);
    let file = reply.files.into_iter().next().unwrap();
    let set = request(
        SET_INFLIGHT_FD,
        FLAG_NEED_REPLY,
        g.bytes().to_vec(),
        vec![file],
    );
    send_message(&core, &set).unwrap();
    let ack = recv_message(&core).unwrap().unwrap();
    assert_eq!(ack.payload, 0u64.to_le_bytes());
    assert!(handler.set.load(Ordering::SeqCst));
    // SET_VRING_KICK (12) with an fd goes to the daemon unchanged.
    let kick = tempfile::tempfile().unwrap();
    let kick = request(12, 0, 7u64.to_le_bytes().to_vec(), vec![kick]);
    send_message(&core, &kick).unwrap();
    let fwd = recv_message(&daemon).unwrap().unwrap();
    assert_eq!((fwd.request, fwd.files.len()), (12, 1));
    assert_eq!(fwd.payload, 7u64.to_le_bytes());
    // A daemon reply comes back to the frontend.
    let answer = request(1, FLAG_REPLY, 42u64.to_le_bytes().to_vec(), vec![]);
    send_message(&daemon, &answer).unwrap();
    let back = recv_message(&core).unwrap().unwrap();
    assert_eq!(back.payload, 42u64.to_le_bytes());
    // The frontend hanging up ends the daemon's side too.
    drop(core);
    assert!(recv_message(&daemon).unwrap().is_none());
    drop(interposer);
}

#[test]
fn a_set_inflight_fd_without_a_region_is_refused_in_the_ack() {
    let (core, _daemon, _guard) = connect(InflightMessages(Arc::new(Recorder::default())));
    let set = request(SET_INFLIGHT_FD, FLAG_NEED_REPLY, vec![0; 24], vec![]);
    send_message(&core, &set).unwrap();
    let ack = recv_message(&core).unwrap().unwrap();
    assert_eq!(ack.payload, 1u64.to_le_bytes());
}

#[test]
fn oversized_messages_end_the_connection() {
    let (core, daemon, _guard) = connect(Passthrough);
    let mut header = Vec::new();
    for w in [1u32, 1, 1 << 20] {
        header.extend_from_slice(&w.to_le_bytes());
    }
    (&core).write_all(&header).unwrap();
    assert!(recv_message(&daemon).unwrap().is_none());
}

fn enable(index: u32, state: u32, flags: u32) -> Message {
    let payload = [index.to_le_bytes(), state.to_le_bytes()].concat();
    request(SET_VRING_ENABLE, flags, payload, vec![])
}

#[test]
fn early_enables_are_acked_held_and_replayed_after_set_features() {
    let (core, daemon, _guard) = connect(EarlyVringEnable::default());
    send_message(&core, &enable(0, 1, FLAG_NEED_REPLY)).unwrap();
    let ack = recv_message(&core).unwrap().unwrap();
    assert_eq!((ack.request, ack.payload), (SET_VRING_ENABLE, vec![0; 8]));
    send_message(&core, &enable(1, 0, 0)).unwrap();
    send_message(&core, &enable(1, 1, 0)).unwrap();
    let features = (PROTOCOL_FEATURES_BIT_FOR_TEST | 1).to_le_bytes().to_vec();
    send_message(&core, &request(SET_FEATURES, 0, features, vec![])).unwrap();
    let first = recv_message(&daemon).unwrap().unwrap();
    assert_eq!(first.request, SET_FEATURES);
    // Each ring's last asked state, in ring order.
    for (index, state) in [(0, 1), (1, 1)] {
        let replay = recv_message(&daemon).unwrap().unwrap();
        assert_eq!(replay.request, SET_VRING_ENABLE);
        assert_eq!(replay.flags & FLAG_NEED_REPLY, 0);
        assert_eq!(
            (replay.payload_u32(0), replay.payload_u32(4)),
            (Some(index), Some(state))
        );
    }
    // After SET_FEATURES an enable passes straight through.
    send_message(&core, &enable(0, 0, 0)).unwrap();
    let later = recv_message(&daemon).unwrap().unwrap();
    assert_eq!(
        (later.request, later.payload_u32(4)),
        (SET_VRING_ENABLE, Some(0))
    );
}

const PROTOCOL_FEATURES_BIT_FOR_TEST: u64 = 1 << 30;

#[test]
fn held_enables_are_dropped_when_protocol_features_are_not_acked() {
    let (core, daemon, _guard) = connect(EarlyVringEnable::default());
    send_message(&core, &enable(0, 1, 0)).unwrap();
    send_message(
        &core,
        &request(SET_FEATURES, 0, 1u64.to_le_bytes().to_vec(), vec![]),
    )
    .unwrap();
    // GET_FEATURES (1) as a marker: nothing was replayed before it.
    send_message(&core, &request(1, 0, vec![], vec![])).unwrap();
    assert_eq!(
        recv_message(&daemon).unwrap().unwrap().request,
        SET_FEATURES
    );
    assert_eq!(recv_message(&daemon).unwrap().unwrap().request, 1);
}
