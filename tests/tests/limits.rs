//! What a hostile client can hold of ferry: connections that never finish their headers
//! (slowloris) or sit idle, beyond the usual soft limit of 1024 open files, do not keep
//! other clients out and are closed after the header timeout; clients that ask for a blob
//! and never read it do not either, hold no more than the send buffer in the kernel, and are
//! closed after the send timeout, nor do uploads
//! whose bodies trickle in; an upload whose body stops frees its session after the body idle
//! timeout. Over HTTP/2, where a client that reads nothing does not block the socket, a
//! connection with a stream that has taken nothing for the send timeout is closed too.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_e2e::*;

fn slow_clients() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("env/slow_clients.py")
        .display()
        .to_string()
}

/// Starts ferry (push store only) through a wrapper that lowers its soft open-file limit to
/// 1024, as most systems set it.
fn ferry_with_low_nofile(dir: &Path, server_toml: &str) -> Ferry {
    let wrapper = dir.join("low-nofile.sh");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nulimit -Sn 1024\nexec {} \"$@\"\n", ferry_bin().display()),
    )
    .unwrap();
    sh(&format!("chmod +x {}", wrapper.display()));
    let config = dir.join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\n{server_toml}\n[cache]\ndir = \"{}\"\n[[backends]]\ntype = \"push\"\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    // Both tests of this file start ferry through the wrapper, so the variable may stay.
    std::env::set_var("FERRY_BIN_PATH", &wrapper);
    Ferry::start_with(dir, &config, &[])
}

#[test]
fn two_thousand_idle_and_slow_connections_do_not_keep_others_out() {
    let dir = scratch();
    let ferry = ferry_with_low_nofile(dir.path(), "header_timeout_secs = 4");
    // ferry raised its own soft limit to the hard one.
    let pid = sh(&format!(
        "ss -ltnpH 'sport = :{}' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2",
        ferry.port
    ));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pid.trim())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit not raised: {line}");

    let holder = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -n 8192 && python3 {} 127.0.0.1 {} 1000 1000 9",
            slow_clients(),
            ferry.port
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // Meanwhile a normal client pushes and pulls a blob.
    normal_client_is_served(&ferry, "idle and slowloris connections", Duration::from_secs(3));

    let out = holder.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["connected"], 2000, "{report}");
    // Every one of them was closed by the header timeout (4 s) within the 9 s they tried.
    assert!(report["closed_by_server"].as_u64().unwrap() >= 1990, "{report}");
    assert!(!ferry.logs().contains("Too many open files"), "{}", ferry.logs());
}

/// ferry's connections on `port` that are open both ways.
fn established(port: u16) -> usize {
    sh(&format!("ss -tnH state established '( sport = :{port} )' | wc -l"))
        .trim()
        .parse()
        .unwrap()
}

/// The most bytes any of ferry's connections on `port` has queued in the kernel, unsent.
fn largest_send_queue(port: u16) -> u64 {
    sh(&format!(
        "ss -tnH state established '( sport = :{port} )' | awk '$2 > m {{ m = $2 }} END {{ print m + 0 }}'"
    ))
    .trim()
    .parse()
    .unwrap()
}

/// `n` connections to ferry that each sent `request` and then do nothing.
fn hold(ferry: &Ferry, request: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(ferry.addr()).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect()
}

/// Lets this test process hold the hundreds of sockets its hostile clients open.
fn more_open_files() {
    sh(&format!("prlimit --pid {} --nofile=8192", std::process::id()));
}

/// A normal client pushes and pulls a blob, all `within` that time.
fn normal_client_is_served(ferry: &Ferry, beside: &str, within: Duration) {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started = Instant::now();
    let data = b"a normal client's blob".repeat(1000);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let r = http
        .post(ferry.url(&format!("/v2/normal/blobs/uploads/?digest={digest}")))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .get(ferry.url(&format!("/v2/normal/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().to_vec(), data);
    assert!(
        started.elapsed() < within,
        "the normal client waited {:?} beside {beside}",
        started.elapsed()
    );
}

#[test]
fn uploads_that_trickle_in_do_not_keep_others_out() {
    more_open_files();
    let dir = scratch();
    let ferry = ferry_with_low_nofile(dir.path(), "body_idle_timeout_secs = 30");
    // More uploads than tokio has blocking threads (512), each announcing 1 MiB and sending
    // 10 bytes of it.
    let digest = format!("sha256:{}", sha256_hex(b"never sent whole"));
    let request = format!(
        "POST /v2/trickle/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n0123456789"
    );
    let _trickling = hold(&ferry, &request, 600);
    std::thread::sleep(Duration::from_secs(1));
    normal_client_is_served(&ferry, "uploads that trickle in", Duration::from_secs(4));
}

#[test]
fn clients_that_never_read_their_blobs_do_not_keep_others_out() {
    more_open_files();
    let dir = scratch();
    let ferry = ferry_with_low_nofile(dir.path(), "send_timeout_secs = 8");
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    // Far more than the sockets between a client and ferry hold.
    let big = incompressible(16 * 1024 * 1024);
    let big_digest = push_blob(&ferry, "stalled", &big);
    // More clients than tokio has blocking threads (512) ask for it and read nothing.
    let request = format!("GET /v2/stalled/blobs/{big_digest} HTTP/1.1\r\nHost: ferry\r\n\r\n");
    let mut stalled = hold(&ferry, &request, 600);
    std::thread::sleep(Duration::from_secs(1));

    // What they hold in the kernel is the send buffer (256 KiB, which Linux doubles), not
    // the 4 MiB a connection it would let each grow to.
    let queued = largest_send_queue(ferry.port);
    assert!(
        (256 << 10..=600 << 10).contains(&queued),
        "a stalled connection has {queued} bytes queued in the kernel"
    );

    // Meanwhile a normal client pushes and pulls, long before the send timeout.
    normal_client_is_served(&ferry, "clients that read nothing", Duration::from_secs(4));
    let r = http
        .get(ferry.url(&format!("/v2/stalled/blobs/{big_digest}")))
        .send()
        .unwrap();
    assert!(r.bytes().unwrap() == big, "the blob came different");
    drop(http);

    // Once a stalled client has taken nothing for 8 s, ferry closes its connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    while established(ferry.port) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        established(ferry.port),
        0,
        "connections still open after the send timeout"
    );
    // What a stalled client reads now is the start of the blob, then the end of the connection.
    for s in stalled.iter_mut().take(5) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("the connection ends");
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&got[..got.len().min(100)])
        );
        assert!(got.len() < big.len(), "the whole blob came");
    }
    assert!(
        ferry.logs().contains("its client stopped reading"),
        "the closing is not in the log"
    );
}

/// A GET of `path` for an HTTP/2 client.
fn h2_get(ferry: &Ferry, path: &str) -> http::Request<()> {
    http::Request::get(ferry.url(path)).body(()).unwrap()
}

/// `n` streams of `client`'s connection, each a GET of `path` answered 200, their bodies not
/// yet read.
async fn streams_of(
    client: &h2::client::SendRequest<bytes::Bytes>,
    ferry: &Ferry,
    path: &str,
    n: usize,
) -> Vec<h2::RecvStream> {
    let mut asked = Vec::new();
    for _ in 0..n {
        let (response, _) = client
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(h2_get(ferry, path), true)
            .unwrap();
        asked.push(response);
    }
    let mut bodies = Vec::new();
    for response in asked {
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    bodies
}

#[test]
fn http2_streams_whose_client_stopped_reading_are_closed() {
    let dir = scratch();
    let ferry = ferry_with_low_nofile(dir.path(), "send_timeout_secs = 3");
    let blob = incompressible(4 * 1024 * 1024);
    let digest = push_blob(&ferry, "h2", &blob);
    let path = format!("/v2/h2/blobs/{digest}");
    let files_before = open_files(ferry.pid());

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // One connection asks for the blob as many times as it may at once (32 streams) and
        // reads none of it: the socket stays free (the client answers pings), only the
        // streams' windows stay shut.
        let tcp = tokio::net::TcpStream::connect(ferry.addr()).await.unwrap();
        let (stalled, conn) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(async move {
            let _ = conn.await;
            Instant::now()
        });
        let asked_at = Instant::now();
        let mut unread = streams_of(&stalled, &ferry, &path, 32).await;
        // The premise: each stalled stream holds the blob's file open in ferry.
        let files_stalled = open_files(ferry.pid());
        assert!(
            files_stalled >= files_before + 16,
            "open files: {files_before} before, {files_stalled} with 32 stalled streams"
        );
        // A 33rd stream is not opened while those are: the connection's streams, and the
        // files they hold, have a ceiling.
        let opened = tokio::time::timeout(Duration::from_secs(1), async {
            let (r, _) = stalled
                .clone()
                .ready()
                .await
                .ok()?
                .send_request(h2_get(&ferry, &path), true)
                .ok()?;
            r.await.ok()
        })
        .await;
        assert!(
            !matches!(opened, Ok(Some(_))),
            "a 33rd stream was served beside 32 open ones"
        );
        assert!(open_files(ferry.pid()) <= files_stalled + 2);

        // Meanwhile another connection reads the blob slowly but steadily, for longer than
        // the send timeout, and gets all of it.
        let tcp = tokio::net::TcpStream::connect(ferry.addr()).await.unwrap();
        let (steady, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let (response, _) = steady
            .ready()
            .await
            .unwrap()
            .send_request(h2_get(&ferry, &path), true)
            .unwrap();
        let mut body = response.await.unwrap().into_body();
        let started = Instant::now();
        let (mut got, mut pauses) = (Vec::new(), 0);
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            let _ = body.flow_control().release_capacity(data.len());
            got.extend_from_slice(&data);
            // 1.2 MiB/s: 4 MiB in some 3.5 s.
            if got.len() / (64 * 1024) > pauses {
                pauses += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(got == blob, "the steady reader got {} bytes, not the blob", got.len());
        assert!(
            started.elapsed() > Duration::from_secs(3),
            "the steady read was not slow"
        );

        // The stalled connection was closed once its streams had waited for the send timeout.
        let closed_at = tokio::time::timeout(Duration::from_secs(20), connection)
            .await
            .expect("the stalled connection is still open")
            .unwrap();
        let waited = closed_at - asked_at;
        assert!(
            waited >= Duration::from_secs(3),
            "closed {waited:?} after the requests, before the send timeout"
        );
        // What a stalled stream reads now is an error, not the blob.
        let mut first = unread.swap_remove(0);
        let mut read = 0;
        let ended = loop {
            match first.data().await {
                Some(Ok(data)) => read += data.len(),
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        assert!(
            ended.is_some() && read < blob.len(),
            "a stalled stream ended cleanly after {read} bytes"
        );
    });
    // Their files are closed with them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_files(ferry.pid()) > files_before + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        open_files(ferry.pid()) <= files_before + 5,
        "ferry still holds {} files (it held {files_before} before)",
        open_files(ferry.pid())
    );
    let logs = ferry.logs();
    assert!(
        logs.contains("its client stopped reading a response (HTTP/2)") && logs.contains(&path),
        "the closing is not in the log"
    );
}

#[test]
fn an_upload_whose_body_stops_frees_its_session() {
    let dir = scratch();
    let ferry = ferry_with_low_nofile(dir.path(), "body_idle_timeout_secs = 2");
    let http = reqwest::blocking::Client::new();
    let r = http.post(ferry.url("/v2/stuck/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["Location"].to_str().unwrap().to_string();
    // A PATCH that announces 1000 bytes and sends 10.
    let mut stuck = TcpStream::connect(ferry.addr()).unwrap();
    stuck
        .write_all(
            format!(
                "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The session is busy with it; once its body has been idle for 2 s it fails and the
    // session is free again, as it stood before the PATCH.
    let started = Instant::now();
    let r = http.get(ferry.url(&location)).send().unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["Range"], "0-0", "nothing of the stopped PATCH was kept");
    assert!(started.elapsed() < Duration::from_secs(6), "{:?}", started.elapsed());
    stuck.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = Vec::new();
    let _ = stuck.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || !answer.starts_with("HTTP/1.1 202"), "{answer}");
    // The upload goes on normally.
    let r = http.patch(ferry.url(&location)).body(b"hello".to_vec()).send().unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["Range"], "0-4");
}

/// A gauge of `/metrics`, by its full name.
fn gauge(ferry: &Ferry, name: &str) -> u64 {
    let text = reqwest::blocking::get(ferry.url("/metrics")).unwrap().text().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics"))
}

/// Peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn many_http2_connections_of_slow_streams_stay_under_the_ceilings_while_a_client_pulls() {
    const CONNECTIONS: usize = 64;
    const STREAMS: usize = 32;
    const READ_AHEAD_MIB: u64 = 4;
    let dir = scratch();
    let ferry = ferry_with_low_nofile(dir.path(), &format!("read_ahead = \"{READ_AHEAD_MIB}MiB\""));
    let blob = incompressible(16 * 1024 * 1024);
    let digest = push_blob(&ferry, "hostile", &blob);
    let path = format!("/v2/hostile/blobs/{digest}");
    let rss_before = peak_rss_mib(ferry.pid());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let held = runtime.block_on(async {
        // 64 connections open as many streams as each may (32), each asking for the blob and
        // taking just its first window's worth: 2048 streams, all waiting on their clients.
        let (mut held, mut clients) = (Vec::new(), Vec::new());
        for _ in 0..CONNECTIONS {
            let tcp = tokio::net::TcpStream::connect(ferry.addr()).await.unwrap();
            let (client, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            held.extend(streams_of(&client, &ferry, &path, STREAMS).await);
            clients.push(client);
        }
        (held, clients)
    });
    // Every stream is served at once, and what they read ahead stays within the budget.
    std::thread::sleep(Duration::from_secs(1));
    let streams = gauge(&ferry, "ferry_blob_streams");
    let read_ahead = gauge(&ferry, "ferry_read_ahead_bytes");
    assert!(
        streams >= (CONNECTIONS * STREAMS) as u64,
        "{streams} blob streams served"
    );
    assert!(
        read_ahead <= READ_AHEAD_MIB << 20,
        "{read_ahead} bytes read ahead, over the {READ_AHEAD_MIB} MiB budget"
    );

    // A normal client pulls the blob meanwhile, whole.
    let started = Instant::now();
    let got = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .get(ferry.url(&path))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(got == blob, "the normal client got {} bytes, not the blob", got.len());
    let took = started.elapsed();

    // Memory: what ferry held at its peak, against the ceiling RELIABILITY.md states for
    // this many streams: over what it held before, the budget and 40 KiB a stream (one chunk
    // of 8 KiB, the HTTP/2 stream's and its request's state; measured: about 16).
    let peak = peak_rss_mib(ferry.pid());
    let ceiling = rss_before + READ_AHEAD_MIB + (CONNECTIONS * STREAMS) as u64 * 40 / 1024;
    eprintln!(
        "{} streams: peak RSS {peak} MiB ({rss_before} before, ceiling {ceiling}), read ahead {read_ahead} B, normal pull {took:?}",
        CONNECTIONS * STREAMS
    );
    assert!(peak <= ceiling, "peak RSS {peak} MiB, over the {ceiling} MiB ceiling");
    drop(held);
}
