//! `plexvm-hostile`: a vhost-user backend that misbehaves on purpose (issue 12).
//!
//! It is a proxy in front of a real backend: it runs the backend named after the act on a
//! private socket, forwards every message between the core and it (with their fds), and
//! does one hostile act, chosen with `--act`, at the first message of the request
//! named with `--on` (e.g. `SET_MEM_TABLE`):
//!
//! | act | what it does |
//! |---|---|
//! | `wrong-reply-id` | the reply names another request |
//! | `wrong-reply-size` | the reply's size field says 8 bytes more than the request's reply has, and 8 junk bytes follow |
//! | `wrong-reply-flags` | the reply lacks the REPLY flag |
//! | `oversized-reply` | the reply is replaced by one of 64 KiB (an oversized GET_CONFIG when `--on GET_CONFIG`) |
//! | `call-flood` | signals every call eventfd it is given 200000 times from a thread |
//! | `ftruncate` | truncates every fd that comes with the request (guest RAM for SET_MEM_TABLE) to 0 bytes, and says what happened on stderr |
//! | `close-mid-message` | sends half of the reply, then exits |
//! | `never-reply` | swallows the reply and every later one, and stays alive |
//! | `reply-twice` | sends the reply twice |
//!
//! Usage (the core appends `--socket PATH`): `plexvm-hostile --act ACT --on REQUEST
//! plexvm-blk --image disk.raw`. Test tooling only.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const HEADER_LEN: usize = 12;
const MAX_FDS: usize = 32;
const FLAG_REPLY: u32 = 0x4;

/// vhost-user request codes (vhost-user spec, "Front-end message types").
const REQUESTS: &[(&str, u32)] = &[
    ("GET_FEATURES", 1),
    ("SET_FEATURES", 2),
    ("SET_OWNER", 3),
    ("SET_MEM_TABLE", 5),
    ("SET_VRING_NUM", 8),
    ("SET_VRING_ADDR", 9),
    ("SET_VRING_BASE", 10),
    ("GET_VRING_BASE", 11),
    ("SET_VRING_KICK", 12),
    ("SET_VRING_CALL", 13),
    ("SET_VRING_ERR", 14),
    ("GET_PROTOCOL_FEATURES", 15),
    ("SET_PROTOCOL_FEATURES", 16),
    ("GET_QUEUE_NUM", 17),
    ("SET_VRING_ENABLE", 18),
    ("GET_CONFIG", 24),
    ("GET_INFLIGHT_FD", 31),
    ("SET_INFLIGHT_FD", 32),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    WrongReplyId,
    WrongReplySize,
    WrongReplyFlags,
    OversizedReply,
    CallFlood,
    Ftruncate,
    CloseMidMessage,
    NeverReply,
    ReplyTwice,
}

impl Act {
    fn parse(s: &str) -> Option<Act> {
        Some(match s {
            "wrong-reply-id" => Act::WrongReplyId,
            "wrong-reply-size" => Act::WrongReplySize,
            "wrong-reply-flags" => Act::WrongReplyFlags,
            "oversized-reply" => Act::OversizedReply,
            "call-flood" => Act::CallFlood,
            "ftruncate" => Act::Ftruncate,
            "close-mid-message" => Act::CloseMidMessage,
            "never-reply" => Act::NeverReply,
            "reply-twice" => Act::ReplyTwice,
            _ => return None,
        })
    }
}

struct Args {
    act: Act,
    on: u32,
    socket: PathBuf,
    backend: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // The core appends `--socket PATH` after everything, the backend's arguments too.
    let n = args.len();
    if n < 2 || args[n - 2] != "--socket" {
        return Err("missing --socket PATH at the end".into());
    }
    let socket = PathBuf::from(args.pop().unwrap_or_default());
    args.pop();
    // `--act ACT --on REQUEST BACKEND...`: fixed places, so that no option parser on
    // the way (`plexvm ctl swap --exec ...`) takes the backend's arguments.
    if args.len() < 5 || args[0] != "--act" || args[2] != "--on" {
        return Err("usage: plexvm-hostile --act ACT --on REQUEST BACKEND [ARGS...]".into());
    }
    let backend = args.split_off(4);
    let act = Act::parse(&args[1]).ok_or(format!("unknown act {}", args[1]))?;
    let on = REQUESTS
        .iter()
        .find(|(name, _)| *name == args[3])
        .map(|(_, code)| *code)
        .ok_or(format!("unknown request {}", args[3]))?;
    if backend.is_empty() {
        return Err("no backend after --".into());
    }
    Ok(Args {
        act,
        on,
        socket,
        backend,
    })
}

struct Message {
    header: [u8; HEADER_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn word(&self, i: usize) -> u32 {
        u32::from_le_bytes([
            self.header[i],
            self.header[i + 1],
            self.header[i + 2],
            self.header[i + 3],
        ])
    }

    fn set_word(&mut self, i: usize, v: u32) {
        self.header[i..i + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = self.header.to_vec();
        b.extend_from_slice(&self.payload);
        b
    }
}

fn recv(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut cmsg = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_LEN,
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.len();
    // SAFETY: recvmsg writes only into the buffers `msg` points at.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count.min(MAX_FDS) {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 {
        return Ok(None);
    }
    (&*sock).read_exact(&mut header[n as usize..])?;
    let mut m = Message {
        header,
        payload: Vec::new(),
        fds,
    };
    let size = m.word(8) as usize;
    if size > 0x10000 {
        return Err(io::Error::other(format!("message of {size} bytes")));
    }
    m.payload = vec![0u8; size];
    (&*sock).read_exact(&mut m.payload)?;
    Ok(Some(m))
}

fn send(sock: &UnixStream, bytes: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmsg = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        let len = raw.len() * 4;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation; the buffer holds 32 fds.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(len as u32) } as usize;
        // SAFETY: the control buffer is large enough for one header and `raw`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
        }
    }
    // SAFETY: sendmsg reads only the buffers `msg` points at.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    (&*sock).write_all(&bytes[n as usize..])
}

/// Core → backend, doing the request-side acts.
fn requests(args: &Args, core: UnixStream, backend: UnixStream) -> io::Result<()> {
    let mut done = false;
    while let Some(m) = recv(&core)? {
        if !done && m.word(0) == args.on {
            match args.act {
                Act::Ftruncate => {
                    done = true;
                    for fd in &m.fds {
                        // SAFETY: ftruncate on an fd we hold; no memory is passed.
                        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
                        let what = if r == 0 {
                            "succeeded".to_string()
                        } else {
                            format!("failed: {}", io::Error::last_os_error())
                        };
                        eprintln!("plexvm-hostile: ftruncate(fd {}, 0) {what}", fd.as_raw_fd());
                    }
                }
                Act::CallFlood if m.word(0) == 13 => {
                    for fd in &m.fds {
                        let fd = fd.try_clone()?;
                        std::thread::spawn(move || flood(fd));
                    }
                }
                _ => {}
            }
        }
        send(&backend, &m.bytes(), &m.fds)?;
    }
    Ok(())
}

/// Call-eventfd signals in a `call-flood`.
const FLOOD: u32 = 200_000;

fn flood(fd: OwnedFd) {
    eprintln!("plexvm-hostile: flooding a call eventfd with {FLOOD} signals");
    let one = 1u64.to_ne_bytes();
    for _ in 0..FLOOD {
        // SAFETY: writes 8 bytes from a live buffer to an eventfd we hold.
        unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
    eprintln!("plexvm-hostile: signalled a call eventfd {FLOOD} times");
}

/// Backend → core, doing the reply-side acts.
fn replies(args: &Args, backend: UnixStream, core: UnixStream) -> io::Result<()> {
    let mut done = false;
    let mut silent = false;
    while let Some(mut m) = recv(&backend)? {
        if silent {
            continue;
        }
        if done || m.word(0) != args.on {
            send(&core, &m.bytes(), &m.fds)?;
            continue;
        }
        done = true;
        eprintln!(
            "plexvm-hostile: {:?} on the reply to request {}",
            args.act, args.on
        );
        match args.act {
            Act::WrongReplyId => {
                let id = m.word(0);
                m.set_word(0, id + 1);
                send(&core, &m.bytes(), &m.fds)?;
            }
            Act::WrongReplySize => {
                let size = m.word(8);
                m.set_word(8, size + 8);
                m.payload.extend_from_slice(&[0xa5; 8]);
                send(&core, &m.bytes(), &m.fds)?;
            }
            Act::WrongReplyFlags => {
                let flags = m.word(4);
                m.set_word(4, flags & !FLAG_REPLY);
                send(&core, &m.bytes(), &m.fds)?;
            }
            Act::OversizedReply => {
                m.payload = vec![0x5a; 0x10000];
                m.set_word(8, 0x10000);
                send(&core, &m.bytes(), &[])?;
            }
            Act::CloseMidMessage => {
                let bytes = m.bytes();
                send(&core, &bytes[..bytes.len() / 2], &[])?;
                std::process::exit(3);
            }
            Act::NeverReply => silent = true,
            Act::ReplyTwice => {
                send(&core, &m.bytes(), &m.fds)?;
                send(&core, &m.bytes(), &m.fds)?;
            }
            Act::CallFlood | Act::Ftruncate => send(&core, &m.bytes(), &m.fds)?,
        }
    }
    Ok(())
}

fn connect_inner(path: &std::path::Path) -> io::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn run(args: Args) -> io::Result<()> {
    let inner = PathBuf::from(format!("{}.inner", args.socket.display()));
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let program = exe_dir.join(&args.backend[0]);
    let program = if program.exists() {
        program
    } else {
        PathBuf::from(&args.backend[0])
    };
    let mut cmd = Command::new(program);
    cmd.args(&args.backend[1..]).arg("--socket").arg(&inner);
    // SAFETY: prctl is async-signal-safe; the backend dies with this proxy.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let _child = cmd.spawn()?;
    let backend = connect_inner(&inner)?;
    let _ = std::fs::remove_file(&args.socket);
    let listener = UnixListener::bind(&args.socket)?;
    let (core, _) = listener.accept()?;
    let (core2, backend2) = (core.try_clone()?, backend.try_clone()?);
    let args = std::sync::Arc::new(args);
    let a = args.clone();
    let up = std::thread::spawn(move || replies(&a, backend2, core2));
    let r = requests(&args, core, backend);
    let _ = up.join();
    let _ = std::fs::remove_file(&inner);
    r
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("plexvm-hostile: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("plexvm-hostile: {e}");
            ExitCode::FAILURE
        }
    }
}
