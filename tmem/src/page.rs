//! How one page is kept: same-filled pages as their 8-byte pattern, the others compressed with
//! LZ4 (or as they are, when that does not make them smaller), each with a checksum of its bytes.

use xxhash_rust::xxh3::xxh3_64;

/// The size of a page: what `put` takes and `get` gives back.
pub const PAGE_SIZE: usize = 4096;

/// One page of bytes.
pub type Page = [u8; PAGE_SIZE];

/// A compressed page is kept as it is when compression saves less than this: decompressing it
/// would cost time for almost no space.
const MIN_SAVING: usize = 64;

/// Room LZ4 wants for compressing a page (its output can be a little over the input; a page is
/// stored in at most [`PAGE_SIZE`] bytes all the same).
pub(crate) const SCRATCH: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// What a page was turned into.
pub(crate) enum Encoded<'s> {
    /// Every 8-byte word of the page holds this value (zero pages are the common case).
    Filled(u64),
    /// The page's bytes, LZ4-compressed (`compressed`) or as they are.
    Bytes { bytes: &'s [u8], compressed: bool },
}

/// The 8-byte pattern that fills the whole page, if one does.
pub(crate) fn filled_with(page: &Page) -> Option<u64> {
    let mut words = page.chunks_exact(8).map(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")));
    let first = words.next().expect("a page has words");
    words.all(|w| w == first).then_some(first)
}

/// Encodes `page`, using `scratch` (at least [`SCRATCH`] bytes) for the compressed form.
/// With `compress` false, pages other than same-filled ones are kept as they are.
pub(crate) fn encode<'s>(page: &'s Page, compress: bool, scratch: &'s mut [u8]) -> Encoded<'s> {
    if let Some(word) = filled_with(page) {
        return Encoded::Filled(word);
    }
    if compress {
        if let Ok(len) = lz4_flex::block::compress_into(page, scratch) {
            if len + MIN_SAVING <= PAGE_SIZE {
                return Encoded::Bytes { bytes: &scratch[..len], compressed: true };
            }
        }
    }
    Encoded::Bytes { bytes: page, compressed: false }
}

/// Fills `out` with `word` repeated.
pub(crate) fn fill(out: &mut Page, word: u64) {
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&word.to_ne_bytes());
    }
}

/// Decodes stored `bytes` into `out`; false when they are not a page (a corrupt or foreign
/// block: wrong length, or LZ4 data that does not decode to exactly one page).
pub(crate) fn decode(bytes: &[u8], compressed: bool, out: &mut Page) -> bool {
    if !compressed {
        if bytes.len() != PAGE_SIZE {
            return false;
        }
        out.copy_from_slice(bytes);
        return true;
    }
    matches!(lz4_flex::block::decompress_into(bytes, out), Ok(PAGE_SIZE))
}

/// The checksum kept with every page, checked on every `get`.
pub(crate) fn checksum(page: &Page) -> u64 {
    xxh3_64(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(page: &Page) -> Option<u64> {
        let mut scratch = vec![0u8; SCRATCH];
        let mut out = [0xAAu8; PAGE_SIZE];
        match encode(page, true, &mut scratch) {
            Encoded::Filled(word) => {
                fill(&mut out, word);
                assert_eq!(&out, page);
                Some(word)
            }
            Encoded::Bytes { bytes, compressed } => {
                assert!(decode(bytes, compressed, &mut out));
                assert_eq!(&out, page);
                None
            }
        }
    }

    #[test]
    fn zero_and_same_filled_pages_are_their_pattern() {
        assert_eq!(roundtrip(&[0; PAGE_SIZE]), Some(0));
        let mut page = [0u8; PAGE_SIZE];
        fill(&mut page, 0x0102_0304_0506_0708);
        assert_eq!(roundtrip(&page), Some(0x0102_0304_0506_0708));
        page[4095] ^= 1;
        assert_eq!(roundtrip(&page), None);
    }

    #[test]
    fn text_compresses_and_random_bytes_are_kept_as_they_are() {
        let text: Vec<u8> =
            b"the quick brown fox jumps over the lazy dog; ".iter().copied().cycle().take(PAGE_SIZE).collect();
        let text: Page = text.try_into().unwrap();
        let mut scratch = vec![0u8; SCRATCH];
        match encode(&text, true, &mut scratch) {
            Encoded::Bytes { bytes, compressed: true } => assert!(bytes.len() < PAGE_SIZE / 4, "{}", bytes.len()),
            _ => panic!("text is compressed"),
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut random = [0u8; PAGE_SIZE];
        for b in random.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        match encode(&random, true, &mut scratch) {
            Encoded::Bytes { bytes, compressed: false } => assert_eq!(bytes.len(), PAGE_SIZE),
            _ => panic!("random bytes are kept as they are"),
        }
        assert_eq!(roundtrip(&random), None);
    }

    #[test]
    fn garbage_does_not_decode() {
        let mut out = [0u8; PAGE_SIZE];
        assert!(!decode(&[0xFF; 100], true, &mut out));
        assert!(!decode(&[0; 100], false, &mut out));
        // A valid LZ4 block of something that is not one page long.
        let short = lz4_flex::block::compress(&[7u8; 100]);
        assert!(!decode(&short, true, &mut out));
    }
}
