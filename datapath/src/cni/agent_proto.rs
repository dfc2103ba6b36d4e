//! The CNI plugin ↔ node agent protocol: one JSON request line, one JSON response line,
//! over the agent's Unix socket (`agentSocket` in the CNI config).
//!
//! ADD asks the agent to attach the policy programs to the new host-side interface and
//! waits for the answer, so no pod sends a packet unpoliced. STATUS and CHECK send a
//! `ping`. JSON lines rather than a binary framing: the agent and the plugin are built
//! from one tree, but a human with `socat` can still talk to the socket when debugging.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// What the plugin asks of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    /// Attach the policy programs to `host_ifname` before the pod starts.
    #[serde(rename_all = "camelCase")]
    Attach(AttachRequest),
    /// Liveness: the agent answers `ok` when it can serve attach requests.
    Ping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachRequest {
    pub container_id: String,
    /// The interface name inside the pod (CNI_IFNAME).
    pub ifname: String,
    /// The host side of the veth pair, where the tc programs go.
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ip: Ipv4Addr,
    pub netns: String,
    /// The pod (from CNI_ARGS), so the agent can police `ip` as that pod at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Connect, write or read failed or timed out: the runtime should retry later.
    #[error("node agent at {socket} unreachable: {source}")]
    Unreachable { socket: PathBuf, source: io::Error },
    /// The agent answered, and said no.
    #[error("node agent at {socket} refused: {msg}")]
    Refused { socket: PathBuf, msg: String },
    #[error("node agent at {socket} answered something that is not a response line: {msg}")]
    Protocol { socket: PathBuf, msg: String },
}

/// Sends one request and waits (at most `timeout` per I/O step) for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<(), AgentError> {
    let unreachable = |source| AgentError::Unreachable { socket: socket.to_path_buf(), source };
    let mut s = UnixStream::connect(socket).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).expect("request serializes");
    line.push(b'\n');
    s.write_all(&line).map_err(unreachable)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(unreachable)?;
    if answer.is_empty() {
        return Err(unreachable(io::Error::new(io::ErrorKind::UnexpectedEof, "closed without an answer")));
    }
    let resp: Response = serde_json::from_str(answer.trim_end()).map_err(|e| AgentError::Protocol {
        socket: socket.to_path_buf(),
        msg: format!("{e}: {}", answer.trim_end()),
    })?;
    if resp.ok {
        Ok(())
    } else {
        Err(AgentError::Refused {
            socket: socket.to_path_buf(),
            msg: resp.error.unwrap_or_else(|| "no reason given".into()),
        })
    }
}

/// The agent's side: a running attach server. Dropping it stops accepting, waits for the
/// accept thread and removes the socket file.
pub struct AttachServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AttachServer {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AttachServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // A connection wakes the thread blocked in accept(); shutdown() on a listening
        // Unix socket is not guaranteed to.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves attach requests on `socket_path` (a leftover socket file from a crashed agent
/// is replaced). `handler` runs on a thread per connection, so one slow attach does not
/// hold up other pods' ADDs; its `Err` is sent back as the refusal reason. Pings are
/// answered without calling it.
pub fn serve_attach<F>(socket_path: &Path, handler: F) -> io::Result<AttachServer>
where
    F: Fn(AttachRequest) -> Result<(), String> + Send + Sync + 'static,
{
    match std::fs::remove_file(socket_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(socket_path)?;
    let stop = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(handler);
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new().name("ks-cni-attach".into()).spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let handler = handler.clone();
                std::thread::spawn(move || serve_one(conn, &*handler));
            }
        })?
    };
    Ok(AttachServer { path: socket_path.to_path_buf(), stop, thread: Some(thread) })
}

fn serve_one(conn: UnixStream, handler: &(dyn Fn(AttachRequest) -> Result<(), String> + Send + Sync)) {
    // A client that connects and never writes must not pin a thread forever.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = String::new();
    if BufReader::new(&conn).read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let resp = match serde_json::from_str::<Request>(line.trim_end()) {
        Ok(Request::Ping) => Response { ok: true, error: None },
        Ok(Request::Attach(req)) => match handler(req) {
            Ok(()) => Response { ok: true, error: None },
            Err(e) => Response { ok: false, error: Some(e) },
        },
        Err(e) => Response { ok: false, error: Some(format!("bad request line: {e}")) },
    };
    let mut out = serde_json::to_vec(&resp).expect("response serializes");
    out.push(b'\n');
    let _ = (&conn).write_all(&out);
}
