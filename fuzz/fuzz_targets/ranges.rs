//! `Range` and `Content-Range` headers: parsing never panics, a range that resolves lies
//! inside the blob, and a Content-Range's first byte is never after its last.
#![no_main]

use ferry_core::ByteRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8])) >> (data[0] % 64);
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let Some(range) = ByteRange::parse(header) {
        if let Ok((offset, len)) = range.resolve(size) {
            assert!(
                offset.checked_add(len).is_some_and(|end| end <= size),
                "{header:?} in {size}"
            );
            assert!(len > 0, "{header:?} in {size}: an empty range is not satisfiable");
        }
    }
    if let Some((first, last)) = ByteRange::parse_content_range(header) {
        assert!(first <= last);
    }
});
