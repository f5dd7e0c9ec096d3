//! Repository names, `ns` values, references and digests as clients send them: parsing
//! never panics, and a name that parses comes back the same from its canonical and familiar
//! forms (the docker.io / library/ normalisation is one-to-one).
#![no_main]

use ferry_core::{Digest, Reference, Repository};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (name, ns) = match text.split_once('\n') {
        Some((n, ns)) => (n, Some(ns)),
        None => (text, None),
    };
    if let Ok(repo) = Repository::from_request(name, ns) {
        assert_eq!(Repository::new(repo.registry(), repo.path()).ok().as_ref(), Some(&repo));
        // The short forms name the same repository (where they fit the length limit, which
        // counts what a client sends).
        for form in [repo.request_name(), repo.familiar(), repo.canonical()] {
            if form.len() <= 255 {
                let back = Repository::from_request(&form, None).expect("its own forms parse");
                assert_eq!(back, repo, "{form}");
            }
        }
    }
    if let Ok(r) = Reference::parse(name) {
        assert_eq!(Reference::parse(&r.to_string()).ok(), Some(r));
    }
    if let Ok(d) = name.parse::<Digest>() {
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d.clone()));
        assert_eq!(d.hex().len(), 64);
    }
});
