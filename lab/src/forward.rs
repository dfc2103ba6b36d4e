//! Makes the apiserver, which lives in the control-plane netns, reachable from the host
//! on a loopback port, without giving the host an address or a route into the lab.
//!
//! Sockets keep the network namespace they were created in, so one thread that has
//! entered the control-plane netns opens the upstream connections, and the copying
//! happens on ordinary tokio tasks in the host namespace.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

pub struct ForwardArgs {
    pub listen: SocketAddr,
    pub netns: String,
    pub target: SocketAddr,
    /// The chosen port is written here once listening (for `--listen 127.0.0.1:0`).
    pub port_file: PathBuf,
}

type ConnectRequest = oneshot::Sender<std::io::Result<std::net::TcpStream>>;

fn connector(netns: String, target: SocketAddr) -> Result<mpsc::UnboundedSender<ConnectRequest>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<ConnectRequest>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("connector".into()).spawn(move || {
        if let Err(e) = crate::sys::enter_netns(&netns) {
            let _ = ready_tx.send(Err(e));
            return;
        }
        let _ = ready_tx.send(Ok(()));
        while let Some(reply) = rx.blocking_recv() {
            let r = std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(5));
            let _ = reply.send(r);
        }
    })?;
    ready_rx.recv().context("connector thread died")??;
    Ok(tx)
}

pub async fn run(args: ForwardArgs) -> Result<()> {
    let connect = connector(args.netns.clone(), args.target)?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let port = listener.local_addr()?.port();
    std::fs::write(&args.port_file, port.to_string())?;
    tracing::info!("forwarding 127.0.0.1:{port} to {} in netns {}", args.target, args.netns);
    loop {
        let (mut down, _) = listener.accept().await?;
        let connect = connect.clone();
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            if connect.send(tx).is_err() {
                return;
            }
            let up = match rx.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!("upstream connect failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            if up.set_nonblocking(true).is_err() {
                return;
            }
            let Ok(mut up) = TcpStream::from_std(up) else { return };
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
    }
}
