//! Physical compaction of FFN channels (METHODS.md section 7) around the
//! gather itself, which is a `Backend` op (`gather_rows`, `gather_cols`):
//! zero padding of the gathered matrices (raw little-endian bytes of any
//! dtype, so the output keeps the input dtype bit for bit) and FLAP's bias
//! compensation.

/// Appends zero rows to a row-major matrix until it has `to` rows.
pub fn pad_rows(mut bytes: Vec<u8>, elem: usize, cols: usize, to: usize) -> Vec<u8> {
    bytes.resize(to * cols * elem, 0);
    bytes
}

/// Appends zero columns to a row-major `[rows, cols]` matrix until it has `to` columns.
pub fn pad_cols(bytes: &[u8], elem: usize, cols: usize, to: usize) -> Vec<u8> {
    let rows = bytes.len() / (cols * elem).max(1);
    let mut out = vec![0u8; rows * to * elem];
    for r in 0..rows {
        out[r * to * elem..][..cols * elem]
            .copy_from_slice(&bytes[r * cols * elem..][..cols * elem]);
    }
    out
}

/// FLAP's bias compensation: the mean contribution of the removed channels,
/// β = Σ_{c pruned} (s1_c/n)·w_c, w_c = column c of W_d (`[d, m]` row-major).
pub fn flap_bias(w_down: &[f32], d: usize, m: usize, kept: &[usize], mean_h: &[f64]) -> Vec<f32> {
    let mut is_kept = vec![false; m];
    for &c in kept {
        is_kept[c] = true;
    }
    (0..d)
        .map(|i| {
            let row = &w_down[i * m..(i + 1) * m];
            (0..m)
                .filter(|&c| !is_kept[c])
                .map(|c| mean_h[c] * row[c] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_preserve_order_and_bytes() {
        // [3, 2] matrix of 2-byte elements padded to 3 columns.
        let cols = vec![2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23];
        let padded = pad_cols(&cols, 2, 2, 3);
        assert_eq!(
            padded,
            vec![2, 3, 6, 7, 0, 0, 10, 11, 14, 15, 0, 0, 18, 19, 22, 23, 0, 0]
        );
        assert_eq!(pad_rows(vec![1, 2], 1, 2, 2), vec![1, 2, 0, 0]);
    }

    #[test]
    fn flap_bias_sums_removed_columns_weighted_by_mean() {
        // W_d = [[1, 2, 3], [4, 5, 6]], keep channel 1; means 10, 20, 30.
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = flap_bias(&w, 2, 3, &[1], &[10.0, 20.0, 30.0]);
        assert_eq!(b, vec![10.0 + 90.0, 40.0 + 180.0]);
    }
}
