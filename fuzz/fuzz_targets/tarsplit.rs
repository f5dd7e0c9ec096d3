//! tar-split streams (the JSON lines an engine keeps for each layer) as a corrupted or
//! hostile data root could hold them: parsing never panics, and the size it adds up is the
//! sum of the pieces it yields.
#![no_main]

use ferry_backends::docker::fuzzing::tar_split_pieces;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut total = 0u64;
    for piece in tar_split_pieces(data) {
        match piece {
            Ok(len) => total = total.saturating_add(len),
            Err(_) => return,
        }
    }
    let _ = total;
});
