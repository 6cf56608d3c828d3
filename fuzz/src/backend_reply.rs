//! The core's vhost-user frontend fed a backend's replies: the input is the whole byte
//! stream a backend sends back on the socket (any headers, sizes, flags, payloads),
//! while the frontend does what the core does with a backend — bring-up, the config
//! copy, a config read, the in-flight buffer, activation of one ring, and the stop.
//! Whatever the backend says, the frontend must not panic, must not read or write
//! outside its buffers, and must end: every step either succeeds or fails with an
//! error, and a broken reply ends the connection.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use plexvm::memory::create_guest_memory;
use plexvm::vhost_user::VhostUserFrontend;
use plexvm::virtio::DeviceState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Runs the frontend against a backend whose replies are `data`.
pub fn backend_reply(data: &[u8]) {
    let Ok((ours, theirs)) = UnixStream::pair() else {
        return;
    };
    let replies = data.to_vec();
    let backend = std::thread::spawn(move || {
        let mut theirs = theirs;
        let _ = theirs.write_all(&replies);
        let _ = theirs.shutdown(Shutdown::Write);
        // Read what the frontend sends until it is done, so it never blocks on a full
        // socket.
        let mut sink = [0u8; 4096];
        while matches!(theirs.read(&mut sink), Ok(n) if n > 0) {}
    });
    drive(ours);
    let _ = backend.join();
}

fn drive(stream: UnixStream) {
    let Ok(mut frontend) = VhostUserFrontend::connect("fuzz", stream, 1) else {
        return;
    };
    frontend.set_reply_timeout(Duration::from_millis(200));
    let _ = frontend.fetch_config(60);
    let mut config = [0u8; 8];
    let _ = frontend.read_config(56, &mut config);
    let inflight = frontend.get_inflight(1, 16).ok();
    let Ok(mem) = create_guest_memory(1 << 20) else {
        return;
    };
    let mut state = DeviceState::new(frontend.virtio_features(), frontend.queue_count(), 16);
    if let Some(q) = state.queues.first_mut() {
        q.size = 16;
        q.ready = true;
        q.desc_table = 0x1000;
        q.avail_ring = 0x2000;
        q.used_ring = 0x3000;
    }
    let fds = |n: usize| -> Vec<EventFd> {
        (0..n)
            .filter_map(|_| EventFd::new(EFD_NONBLOCK).ok())
            .collect()
    };
    let (kicks, calls) = (fds(state.queues.len()), fds(state.queues.len()));
    let _ = frontend.activate(&mut state, &mem, &kicks, &calls, inflight.as_ref());
    frontend.stop(&mut state);
    assert!(state.queues.iter().all(|q| !q.started));
}
