//! Access control with real clients: Basic auth from an htpasswd file (bcrypt) for writes —
//! `docker login` + push (Docker 20), skopeo `--creds`, Podman `--creds` — and for reads
//! (`ctr --user`); read-only mode; the prefix allow-list (also from REGISTRY_PREFIXES), with
//! names outside it unknown and missing from the catalog; a client's flood of wrong passwords
//! held back (429) after a few checks while another client logs in.

use std::path::Path;

use ferry_e2e::*;

fn htpasswd(dir: &Path) -> String {
    let file = dir.join("htpasswd");
    sh(&format!("htpasswd -Bbc {} ann ann-pass 2>/dev/null", file.display()));
    file.display().to_string()
}

#[test]
fn writes_need_a_user_and_real_clients_log_in() {
    let engine = docker20();
    let dir = scratch();
    let file = htpasswd(dir.path());
    let ferry = Ferry::start(
        dir.path(),
        &format!("[access]\nhtpasswd = \"{file}\"\n{}", docker_chain(&engine, "")),
    );
    let addr = ferry.addr();
    let name = unique("auth");
    build_image(&engine, &format!("{name}:v1"), 1);
    let docker_config = dir.path().join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let docker = format!("DOCKER_CONFIG={} docker -H {engine}", docker_config.display());
    let remote = format!("{addr}/team/{name}:v1");
    sh(&format!("{docker} tag {name}:v1 {remote}"));

    // Without credentials a push is refused with a challenge and nothing is stored.
    let (ok, out) = sh_result(&format!("{docker} push {remote}"));
    assert!(!ok && out.contains("no basic auth credentials"), "{out}");
    let r = reqwest::blocking::Client::new()
        .post(ferry.url("/v2/team/x/blobs/uploads/"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"ferry\"");
    assert_oci_error(401, &r.text().unwrap(), 401, "UNAUTHORIZED");
    let r = reqwest::blocking::Client::new()
        .post(ferry.url("/v2/team/x/blobs/uploads/"))
        .basic_auth("ann", Some("wrong"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);

    // Reads stay open for clients that go straight to them (containerd, a cluster's mirror).
    // `/v2/` asks for credentials, as Docker learns there whether to send them (and `docker
    // login` checks them there): the Docker daemon then pulls only once logged in.
    assert_eq!(reqwest::blocking::get(ferry.url("/v2/")).unwrap().status(), 401);
    let certs = mirror_hosts(dir.path(), "docker.io", &addr);
    let out = ctr_pull_and_run(&containerd16(), "e2e", &certs, &format!("docker.io/library/{name}:v1"));
    assert_eq!(out.trim(), format!("hello from {name}:v1"));
    let (ok, out) = sh_result(&format!("{docker} pull {addr}/{name}:v1"));
    assert!(!ok && out.contains("no basic auth credentials"), "{out}");
    let (ok, out) = sh_result(&format!("{docker} login -u ann -p wrong {addr}"));
    assert!(!ok, "{out}");
    // docker login, then pull and push.
    sh(&format!("{docker} login -u ann -p ann-pass {addr}"));
    sh(&format!(
        "{docker} pull {addr}/{name}:v1 && {docker} rmi {addr}/{name}:v1"
    ));
    sh(&format!("{docker} push {remote}"));
    assert_eq!(get_manifest(&ferry, &format!("team/{name}"), "v1", "").0, 200);
    // skopeo and Podman with credentials.
    sh(&format!(
        "skopeo copy --src-tls-verify=false --dest-tls-verify=false --dest-creds ann:ann-pass docker://{remote} docker://{addr}/team/{name}:skopeo"
    ));
    let (ok, out) = sh_result(&format!(
        "skopeo copy --src-tls-verify=false --dest-tls-verify=false --dest-creds ann:nope docker://{remote} docker://{addr}/team/{name}:bad"
    ));
    assert!(!ok, "{out}");
    let store = dir.path().join("podman");
    let podman = format!(
        "podman --root {0}/root --runroot {0}/run --storage-driver vfs",
        store.display()
    );
    sh(&format!("{podman} pull --tls-verify=false {remote}"));
    sh(&format!(
        "{podman} tag {remote} {addr}/team/{name}:podman && {podman} push --tls-verify=false --creds ann:ann-pass {addr}/team/{name}:podman"
    ));
    for tag in ["v1", "skopeo", "podman"] {
        assert_eq!(get_manifest(&ferry, &format!("team/{name}"), tag, "").0, 200, "{tag}");
    }
    assert_eq!(get_manifest(&ferry, &format!("team/{name}"), "bad", "").0, 404);
    sh(&format!("{docker} rmi {remote} {name}:v1"));
}

#[test]
fn reads_too_when_asked_and_ferry_credentials_stay_with_ferry() {
    let engine = docker20();
    let registry = env("E2E_REGISTRY");
    let dir = scratch();
    let file = htpasswd(dir.path());
    let ferry = Ferry::start(
        dir.path(),
        &format!(
            "[access]\nhtpasswd = \"{file}\"\nauth_reads = true\n{}",
            docker_chain(&engine, "pull_missing = true")
        ),
    );
    let name = unique("authr");
    build_image(&engine, &format!("{name}:v1"), 1);
    assert_eq!(reqwest::blocking::get(ferry.url("/v2/")).unwrap().status(), 401);
    assert_eq!(get_manifest(&ferry, &name, "v1", "").0, 401);
    let certs = mirror_hosts(dir.path(), "docker.io", &ferry.addr());
    let image = format!("docker.io/library/{name}:v1");
    let (ok, out) = sh_result(&format!(
        "ctr -a {} -n e2e image pull --hosts-dir {} {image}",
        containerd16(),
        certs.display()
    ));
    assert!(!ok, "{out}");
    sh(&format!(
        "ctr -a {} -n e2e image pull --user ann:ann-pass --hosts-dir {} {image}",
        containerd16(),
        certs.display()
    ));
    sh(&format!("ctr -a {} -n e2e image rm {image}", containerd16()));

    // An engine pull for an authenticated client goes without ferry's credentials.
    let repo = unique("authr/pulled");
    let local = unique("authsrc");
    build_image(&engine, &format!("{local}:v1"), 1);
    sh(&format!(
        "docker -H {engine} tag {local}:v1 {registry}/{repo}:v1 && docker -H {engine} push {registry}/{repo}:v1 \
         && docker -H {engine} rmi {registry}/{repo}:v1 {local}:v1"
    ));
    let r = reqwest::blocking::Client::new()
        .get(ferry.url(&format!("/v2/{registry}/{repo}/manifests/v1")))
        .basic_auth("ann", Some("ann-pass"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());
    assert_eq!(
        count_lines(
            &ferry.logs(),
            &["pulling missing image", &repo, "with_credentials=false"]
        ),
        1,
        "{}",
        ferry.logs()
    );
    sh(&format!("docker -H {engine} rmi {registry}/{repo}:v1 {name}:v1"));
}

#[test]
fn a_flood_of_wrong_passwords_is_held_back_and_others_still_log_in() {
    let engine = docker20();
    let dir = scratch();
    // A costly hash, as a real deployment's: each check takes a core for a while.
    let file = dir.path().join("htpasswd");
    sh(&format!(
        "htpasswd -Bbc -C 12 {} ann ann-pass 2>/dev/null",
        file.display()
    ));
    let ferry = Ferry::start(
        dir.path(),
        &format!(
            "[access]\nhtpasswd = \"{}\"\n{}",
            file.display(),
            docker_chain(&engine, "")
        ),
    );
    // The guesser comes from 127.0.0.2; the user (Docker) from 127.0.0.1.
    let guesser = reqwest::blocking::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap();
    let guesses = std::thread::spawn({
        let (guesser, url) = (guesser.clone(), ferry.url("/v2/"));
        move || {
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..8)
                    .map(|w| {
                        let (guesser, url) = (&guesser, &url);
                        s.spawn(move || {
                            (0..25)
                                .map(|i| {
                                    let r = guesser
                                        .get(url)
                                        .basic_auth("ann", Some(format!("guess-{w}-{i}")))
                                        .send()
                                        .unwrap();
                                    (r.status().as_u16(), r.text().unwrap())
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers.into_iter().flat_map(|w| w.join().unwrap()).collect::<Vec<_>>()
            })
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Meanwhile a user logs in.
    let docker_config = dir.path().join("docker-config");
    std::fs::create_dir_all(&docker_config).unwrap();
    let started = std::time::Instant::now();
    sh(&format!(
        "DOCKER_CONFIG={} docker -H {engine} login -u ann -p ann-pass {}",
        docker_config.display(),
        ferry.addr()
    ));
    let login = started.elapsed();
    let answers = guesses.join().unwrap();
    let checked = answers.iter().filter(|(status, _)| *status == 401).count();
    let held = answers.iter().filter(|(status, _)| *status == 429).collect::<Vec<_>>();
    assert_eq!(checked + held.len(), 200, "other answers: {answers:?}");
    // The guesser had its burst of ten checks (and perhaps one refilled), then waited.
    assert!((10..=12).contains(&checked), "{checked} guesses were checked");
    for (status, body) in held.iter().take(3) {
        assert_oci_error(*status, body, 429, "TOOMANYREQUESTS");
    }
    assert!(
        login < std::time::Duration::from_secs(10),
        "docker login took {login:?} beside the guesses"
    );
    // Even the right password waits now from the guesser's address; not from the user's.
    let r = guesser
        .get(ferry.url("/v2/"))
        .basic_auth("ann", Some("not-remembered"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 429);
    let r = reqwest::blocking::Client::new()
        .get(ferry.url("/v2/"))
        .basic_auth("ann", Some("ann-pass"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let logs = ferry.logs();
    // Logged when its checks ran out, again only after a refilled check: not per request.
    let told = logs
        .matches("its requests are refused (429) until it may try again")
        .count();
    assert!(
        (1..=checked - 9).contains(&told),
        "the guesser is logged {told} times for {checked} checks:\n{logs}"
    );
    assert!(logs.contains("client=127.0.0.2 user=ann"), "the log names the guesser");
}

#[test]
fn read_only_and_prefixes() {
    let engine = docker20();
    let dir = scratch();
    let ferry = Ferry::start(
        dir.path(),
        &format!(
            "[access]\nread_only = true\nprefixes = [\"team/\"]\n{}",
            docker_chain(&engine, "")
        ),
    );
    let (inside, outside) = (unique("team/ro"), unique("ro"));
    build_image(&engine, &format!("{inside}:v1"), 1);
    build_image(&engine, &format!("{outside}:v1"), 1);
    assert_eq!(get_manifest(&ferry, &inside, "v1", "").0, 200);
    let (status, _, body) = get_manifest(&ferry, &outside, "v1", "");
    assert_oci_error(status, &String::from_utf8_lossy(&body), 404, "NAME_UNKNOWN");
    let catalog = reqwest::blocking::get(ferry.url("/v2/_catalog"))
        .unwrap()
        .text()
        .unwrap();
    assert!(catalog.contains(&inside) && !catalog.contains(&outside), "{catalog}");
    let r = reqwest::blocking::Client::new()
        .post(ferry.url(&format!("/v2/{inside}/blobs/uploads/")))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    assert_oci_error(status, &r.text().unwrap(), 405, "UNSUPPORTED");
    let (ok, out) = sh_result(&format!(
        "docker -H {engine} tag {inside}:v1 {}/{inside}:v2 && docker -H {engine} push {}/{inside}:v2",
        ferry.addr(),
        ferry.addr()
    ));
    assert!(!ok, "{out}");
    let _ = sh_result(&format!("docker -H {engine} rmi {}/{inside}:v2", ferry.addr()));

    // REGISTRY_PREFIXES, space-separated, as oci-reg-docker takes it.
    let dir2 = scratch();
    let config = dir2.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[cache]\ndir = \"{}\"\n{}",
            dir2.path().join("data").display(),
            docker_chain(&engine, "")
        ),
    )
    .unwrap();
    let f2 = Ferry::start_with(dir2.path(), &config, &[("REGISTRY_PREFIXES", "nothing/ team/")]);
    assert_eq!(get_manifest(&f2, &inside, "v1", "").0, 200);
    assert_eq!(get_manifest(&f2, &outside, "v1", "").0, 404);
    sh(&format!("docker -H {engine} rmi {inside}:v1 {outside}:v1"));
}

#[test]
fn the_admin_api_reads_as_the_registry_does() {
    let engine = docker20();
    let dir = scratch();
    let file = htpasswd(dir.path());
    let token = "adm1n-token";
    let ferry = Ferry::start(
        dir.path(),
        &format!(
            "[admin]\ntoken = \"{token}\"\n[access]\nhtpasswd = \"{file}\"\nauth_reads = true\nprefixes = [\"team/\"]\n{}",
            docker_chain(&engine, "direct_reads = false")
        ),
    );
    // One engine image under a name inside the prefixes and one outside.
    let (inside, outside) = (unique("team/adm"), unique("adm-other"));
    build_image(&engine, &format!("{inside}:v1"), 1);
    sh(&format!("docker -H {engine} tag {inside}:v1 {outside}:v1"));
    let r = reqwest::blocking::Client::new()
        .get(ferry.url(&format!("/v2/{inside}/manifests/v1")))
        .basic_auth("ann", Some("ann-pass"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "{}", ferry.logs());

    let get = |path: &str, auth: &dyn Fn(reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder| {
        let r = auth(reqwest::blocking::Client::new().get(ferry.url(path)))
            .send()
            .unwrap();
        let challenge = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), challenge, r.text().unwrap())
    };
    let nobody = |r: reqwest::blocking::RequestBuilder| r;
    let wrong = |r: reqwest::blocking::RequestBuilder| r.basic_auth("ann", Some("nope"));
    let ann = |r: reqwest::blocking::RequestBuilder| r.basic_auth("ann", Some("ann-pass"));
    let admin = |r: reqwest::blocking::RequestBuilder| r.bearer_auth(token);
    let bad_token = |r: reqwest::blocking::RequestBuilder| r.bearer_auth("not-it");

    // Reads need a user, as the registry's own do; the admin token reads too.
    for path in ["/api/v1/status", "/api/v1/cache/images", "/api/v1/push/repositories"] {
        for (who, auth) in [
            ("nobody", &nobody as &dyn Fn(_) -> _),
            ("wrong password", &wrong),
            ("wrong token", &bad_token),
        ] {
            let (status, challenge, _) = get(path, auth);
            assert_eq!(
                (status, challenge.as_deref()),
                (401, Some("Basic realm=\"ferry\"")),
                "{path} as {who}"
            );
        }
        assert_eq!(get(path, &ann).0, 200, "{path} as a user");
        assert_eq!(get(path, &admin).0, 200, "{path} as the admin");
    }
    assert_eq!(
        get("/api/v1/openapi.json", &nobody).0,
        200,
        "the document says nothing of the caches"
    );

    // A user sees the names inside the prefixes, as in the catalog; the admin all of them.
    let (_, _, as_user) = get("/api/v1/cache/images", &ann);
    assert!(as_user.contains(&inside) && !as_user.contains(&outside), "{as_user}");
    let (_, _, as_admin) = get("/api/v1/cache/images", &admin);
    assert!(as_admin.contains(&inside) && as_admin.contains(&outside), "{as_admin}");
    sh(&format!("docker -H {engine} rmi {inside}:v1 {outside}:v1"));
}
