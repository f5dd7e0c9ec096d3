//! ferry served in this process for the API tests: the configuration `ferry serve --config`
//! would read, the chain and access rules built from it, `ferry_server::serve` on a loopback
//! port, and its log lines kept to read back.
#![allow(dead_code)]

mod http;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_server::config::{Config, Flags};

pub use http::*;

/// A push store alone.
pub const PUSH_ONLY: &str = "[[backends]]\ntype = \"push\"\n";

/// A directory removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

/// ferry serving on a loopback port from a thread of its own, stopped (gracefully) when
/// dropped.
pub struct InProcess {
    addr: String,
    /// The data directory (`[cache] dir`).
    pub dir: PathBuf,
    logs: Arc<Mutex<Vec<u8>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Log lines written into a shared buffer.
#[derive(Clone)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl InProcess {
    /// Serves `[cache] dir = <dir>/data` plus `toml` (backends and more).
    pub fn start(dir: &Path, toml: &str) -> InProcess {
        let file = dir.join("ferry.toml");
        let data = dir.join("data");
        std::fs::write(&file, format!("[cache]\ndir = \"{}\"\n{toml}", data.display())).unwrap();
        let config = Config::load(Some(&file), &Flags::default()).expect("a valid config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        listener.set_nonblocking(true).unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, serving) = std::sync::mpsc::channel();
        let writer = Logs(logs.clone());
        // One thread runs the server: its log lines (a thread's own subscriber) are this
        // server's alone, whatever other tests run beside it.
        let thread = std::thread::spawn(move || {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_env_filter("info")
                .finish();
            let _log = tracing::subscriber::set_default(subscriber);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let access = Arc::new(config.access.build().expect("access rules"));
                let chain = ferry_server::build_chain(&config).await.expect("the backends build");
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let options = ferry_server::Options {
                    access,
                    ..ferry_server::Options::from(&config.server)
                };
                let _ = ready.send(());
                let shutdown = async {
                    let _ = stopped.await;
                };
                ferry_server::serve(chain, listener, shutdown, options)
                    .await
                    .expect("serving");
            });
        });
        serving.recv().expect("the server started");
        InProcess {
            addr,
            dir: data,
            logs,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// `http://127.0.0.1:port` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&self.logs.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
