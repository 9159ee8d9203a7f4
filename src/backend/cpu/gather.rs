//! The compaction gather on the host (`Backend::gather_rows`, `gather_cols`,
//! METHODS.md section 7): kept channels keep their original order;
//! W_g' = W_g[keep,:], W_u' = W_u[keep,:], W_d' = W_d[:,keep]. Works on the
//! raw little-endian bytes of any dtype, so the output keeps the input
//! dtype bit for bit.
use crate::backend::{check_gather, GatherAxis};
use crate::Result;

/// Rows `keep` of a row-major `[rows, cols]` matrix of `elem`-byte values.
pub(super) fn gather_rows(
    bytes: &[u8],
    elem: usize,
    cols: usize,
    keep: &[usize],
) -> Result<Vec<u8>> {
    check_gather(bytes, elem, cols, keep, GatherAxis::Rows)?;
    let row = cols * elem;
    let mut out = Vec::with_capacity(keep.len() * row);
    for &r in keep {
        out.extend_from_slice(&bytes[r * row..(r + 1) * row]);
    }
    Ok(out)
}

/// Columns `keep` of a row-major `[rows, cols]` matrix of `elem`-byte values.
pub(super) fn gather_cols(
    bytes: &[u8],
    elem: usize,
    cols: usize,
    keep: &[usize],
) -> Result<Vec<u8>> {
    let rows = check_gather(bytes, elem, cols, keep, GatherAxis::Cols)?;
    let mut out = Vec::with_capacity(rows * keep.len() * elem);
    for r in 0..rows {
        let row = &bytes[r * cols * elem..(r + 1) * cols * elem];
        for &c in keep {
            out.extend_from_slice(&row[c * elem..(c + 1) * elem]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_preserve_order_and_bytes() {
        // [3, 4] matrix of 2-byte elements with distinct values.
        let m: Vec<u8> = (0..24).collect();
        assert_eq!(
            gather_rows(&m, 2, 4, &[0, 2]).unwrap(),
            [&m[0..8], &m[16..24]].concat()
        );
        assert_eq!(
            gather_cols(&m, 2, 4, &[1, 3]).unwrap(),
            vec![2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23]
        );
        // The same bytes as [3, 2] of 4-byte elements, kept out of order.
        assert_eq!(
            gather_cols(&m, 4, 2, &[1, 0]).unwrap(),
            [
                &m[4..8],
                &m[0..4],
                &m[12..16],
                &m[8..12],
                &m[20..24],
                &m[16..20]
            ]
            .concat()
        );
    }

    #[test]
    fn bad_gathers_are_errors() {
        let m: Vec<u8> = (0..24).collect();
        let err = |r: Result<Vec<u8>>| r.unwrap_err().to_string();
        assert!(err(gather_rows(&m, 2, 4, &[3])).contains("kept index 3 out of range"));
        assert!(err(gather_cols(&m, 2, 4, &[4])).contains("kept index 4 out of range"));
        assert!(err(gather_rows(&m, 2, 5, &[0])).contains("not whole rows"));
        assert!(err(gather_cols(&m, 4, 4, &[0])).contains("not whole rows"));
        assert!(err(gather_rows(&m, 1, 4, &[0])).contains("1-byte elements"));
        assert!(err(gather_cols(&m, 2, 0, &[])).contains("rows of 0 elements"));
        assert!(err(gather_rows(&m, 4, usize::MAX / 2, &[])).contains("rows of"));
    }
}
