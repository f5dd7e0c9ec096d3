//! The containerd backend's heal against a small fake origin registry, for what no registry
//! here shows on demand: a blob body sent slowly enough that concurrent heals overlap, and an
//! exact count of how often it is fetched, behind a Bearer challenge. It speaks just enough
//! of the distribution API for a blob fetch. (The same registry client against a real
//! distribution with token auth, behind tests/env/token_server.py, is in upstream.rs.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferry_e2e::*;

const TOKEN: &str = "fake-token-7";

struct FakeRegistry {
    addr: String,
    blob_gets: Arc<AtomicUsize>,
}

/// Serves one blob behind a Bearer challenge whose token endpoint wants Basic `user:pass`.
/// Bodies go out slowly (in 64 KiB steps) so concurrent requests overlap.
fn fake_registry(blob: Vec<u8>, user: &'static str, pass: &'static str) -> FakeRegistry {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let blob_gets = Arc::new(AtomicUsize::new(0));
    let (count, realm_addr) = (blob_gets.clone(), addr.clone());
    let blob = Arc::new(blob);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let (blob, count, realm_addr) = (blob.clone(), count.clone(), realm_addr.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let mut auth = String::new();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h
                        .strip_prefix("authorization: ")
                        .or_else(|| h.strip_prefix("Authorization: "))
                    {
                        auth = v.trim().to_string();
                    }
                }
                let mut parts = line.split(' ');
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let basic = format!("Basic {}", base64_encode(&format!("{user}:{pass}")));
                let respond = |s: &mut std::net::TcpStream, status: &str, headers: &str, body: &[u8], slow: bool| {
                    let head = format!(
                        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes());
                    for chunk in body.chunks(65536) {
                        if s.write_all(chunk).is_err() {
                            return;
                        }
                        if slow {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                };
                if path.starts_with("/token") {
                    if auth == basic {
                        respond(
                            &mut stream,
                            "200 OK",
                            "Content-Type: application/json\r\n",
                            format!("{{\"token\":\"{TOKEN}\"}}").as_bytes(),
                            false,
                        );
                    } else {
                        respond(&mut stream, "401 Unauthorized", "", b"", false);
                    }
                } else if path.contains("/blobs/") {
                    if auth != format!("Bearer {TOKEN}") {
                        let challenge = format!(
                            "WWW-Authenticate: Bearer realm=\"http://{realm_addr}/token\",service=\"fake\",scope=\"repository:secret/img:pull\"\r\n"
                        );
                        respond(&mut stream, "401 Unauthorized", &challenge, b"", false);
                    } else if method == "HEAD" {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            blob.len()
                        );
                        let _ = stream.write_all(head.as_bytes());
                    } else {
                        count.fetch_add(1, Ordering::SeqCst);
                        respond(
                            &mut stream,
                            "200 OK",
                            "Content-Type: application/octet-stream\r\n",
                            &blob,
                            true,
                        );
                    }
                } else {
                    respond(&mut stream, "404 Not Found", "", b"", false);
                }
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest);
            });
        }
    });
    FakeRegistry { addr, blob_gets }
}

fn base64_encode(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn bearer_token_flow_with_client_credentials_and_one_fetch_for_concurrent_requests() {
    let ctd17 = env("E2E_CONTAINERD17_SOCK");
    let blob: Vec<u8> = format!("bearer-protected layer {}", unique(""))
        .repeat(200_000)
        .into_bytes();
    let digest = format!("sha256:{}", sha256_hex(&blob));
    let fake = fake_registry(blob.clone(), "tok-user", "tok-pass");
    name_in_containerd("moby", &digest, None);
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!(
            "[origins]\nallow = [\"{}\"]\n[[backends]]\ntype = \"containerd\"\nsocket = \"{ctd17}\"\nnamespace = \"moby\"\n",
            fake.addr
        ),
    );
    let url = ferry.url(&format!("/v2/secret/img/blobs/{digest}?ns={}", fake.addr));
    let http = reqwest::blocking::Client::new();

    // No credentials: the token endpoint refuses, ferry asks the client to authenticate.
    let r = http.get(&url).send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(fake.blob_gets.load(Ordering::SeqCst), 0);

    // With them: token, then the blob; four clients at once cause one fetch from the origin.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = reqwest::blocking::Client::new()
                    .get(&url)
                    .basic_auth("tok-user", Some("tok-pass"))
                    .send()
                    .unwrap();
                (r.status().as_u16(), r.bytes().unwrap().to_vec())
            })
        })
        .collect();
    for c in clients {
        let (status, body) = c.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);
    }
    assert_eq!(
        fake.blob_gets.load(Ordering::SeqCst),
        1,
        "one origin fetch for concurrent requests"
    );
    let listed = sh(&format!("ctr -a {ctd17} -n moby content ls -q"));
    assert!(listed.contains(&digest), "the blob was committed to the content store");
    sh(&format!("ctr -a {ctd17} -n moby content rm {digest}"));
}
