//! Dequantisation of ggml tensor data to f32.
//!
//! Block layouts (ggml-common.h; `d`, `m`, `dmin` are f16, all little-endian).
//! Within a 32-element block, element j < 16 comes from the low nibble of
//! byte j and element j + 16 from its high nibble:
//!
//! | type | elems | bytes | layout | value |
//! |------|-------|-------|--------|-------|
//! | Q4_0 | 32 | 18 | d, qs[16] | (q − 8)·d |
//! | Q4_1 | 32 | 20 | d, m, qs[16] | q·d + m |
//! | Q5_0 | 32 | 22 | d, qh u32, qs[16] | (q − 16)·d, bit 4 of q from qh |
//! | Q5_1 | 32 | 24 | d, m, qh u32, qs[16] | q·d + m |
//! | Q8_0 | 32 | 34 | d, qs i8[32] | q·d |
//! | Q4_K | 256 | 144 | d, dmin, scales[12], qs[128] | (d·sc)·q − dmin·mn |
//! | Q5_K | 256 | 176 | d, dmin, scales[12], qh[32], qs[128] | (d·sc)·q − dmin·mn |
//! | Q6_K | 256 | 210 | ql[128], qh[64], sc i8[16], d | (d·sc)·(q − 32) |
//!
//! The K-quants hold 6-bit (sub-block scale, min) pairs packed into 12
//! bytes (`scale_min_k4`). Products are evaluated in the same order as
//! ggml's C code and gguf-py (never fused), so results are bit-identical.
use crate::quant::GgmlType;
use crate::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// Blocks handed to one rayon task.
const BLOCKS_PER_TASK: usize = 1024;

/// Dequantises `n` elements of tensor `name` of type `ty` from `data`.
/// An unsupported type is an error naming the tensor and the type.
pub fn dequantize(name: &str, ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>> {
    let block: fn(&[u8], &mut [f32]) = match ty.name {
        "F32" => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        "F16" => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        "BF16" => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        "Q4_0" => q4_0,
        "Q4_1" => q4_1,
        "Q5_0" => q5_0,
        "Q5_1" => q5_1,
        "Q8_0" => q8_0,
        "Q4_K" => q4_k,
        "Q5_K" => q5_k,
        "Q6_K" => q6_k,
        _ => {
            return Err(Error::tensor(
                name,
                format!(
                    "ggml type {ty} (id {}) cannot be dequantised; supported: F32, F16, BF16, \
                     Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K",
                    ty.id
                ),
            ))
        }
    };
    if !n.is_multiple_of(ty.block_len) || data.len() != n / ty.block_len * ty.block_bytes {
        return Err(Error::tensor(
            name,
            format!(
                "{n} {ty} elements need {} bytes, got {}",
                n / ty.block_len * ty.block_bytes,
                data.len()
            ),
        ));
    }
    let mut out = vec![0f32; n];
    let (bl, bb) = (ty.block_len, ty.block_bytes);
    out.par_chunks_mut(bl * BLOCKS_PER_TASK)
        .zip(data.par_chunks(bb * BLOCKS_PER_TASK))
        .for_each(|(y, x)| {
            for (yb, xb) in y.chunks_exact_mut(bl).zip(x.chunks_exact(bb)) {
                block(xb, yb);
            }
        });
    Ok(out)
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5 block: low nibbles from `qs`, bit 4 of element
/// j from bit j of `qh`.
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (qs[j] & 0xF) | (h0 << 4);
        q[j + 16] = (qs[j] >> 4) | (h1 << 4);
    }
    q
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (yj, q) in y.iter_mut().zip(q5_values(qh, &b[6..22])) {
        *yj = (q as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (yj, q) in y.iter_mut().zip(q5_values(qh, &b[8..24])) {
        *yj = q as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = q as i8 as f32 * d;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes: the first
/// four pairs are the low 6 bits of bytes j and j+4; the last four take
/// their low 4 bits from byte j+4 and their top 2 bits from the spare top
/// bits of bytes j−4 and j.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Four 64-element chunks; each is two 32-element sub-blocks, from the
    // low then the high nibbles of the same 32 bytes.
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0xF) as f32 - m1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    // As Q4_K; bit 4 of element l of sub-block s is bit s of qh[l].
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1, d2, m2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
            out[l] = d1 * ((q[l] & 0xF) | h1) as f32 - m1;
            out[l + 32] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = half(b, 208);
    // Two 128-element halves; in each, element l + 32k (k = 0..4) takes its
    // low 4 bits from ql (nibble k/2 of byte l + 32(k%2)) and its top 2 bits
    // from bits 2k..2k+2 of qh[l]; scale index l/16 + 2k.
    for h in 0..2 {
        let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
        let out = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &qk) in q.iter().enumerate() {
                let s = sc[is + 2 * k] as i8 as f32;
                out[l + 32 * k] = d * s * (qk as i32 - 32) as f32;
            }
        }
    }
}
