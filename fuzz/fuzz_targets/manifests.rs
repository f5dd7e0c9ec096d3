//! Manifest and index JSON as clients push it: parsing never panics, and what it accepts
//! has a media type and descriptors with valid digests.
#![no_main]

use ferry_core::ManifestInfo;
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 5] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let content_type = TYPES[which as usize % TYPES.len()];
    if let Ok(info) = ManifestInfo::parse(bytes, content_type) {
        assert!(!info.media_type.is_empty());
        for d in info.blobs.iter().chain(&info.manifests) {
            assert_eq!(d.digest.hex().len(), 64);
        }
    }
});
