//! A counter-based random generator: every sample is a pure function of (key, index), so ranks
//! that must agree (tensor-parallel replicas, every slice of one initialisation) draw the same
//! numbers whatever their thread timing, and a rank can draw only the elements it needs.

/// splitmix64: a fast, well-mixed 64-bit hash, used as a counter-based generator.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform sample in (0, 1) for element `i` of the stream `key`.
pub(crate) fn uniform01(key: u64, i: u64) -> f64 {
    ((mix(key ^ mix(i)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal sample for element `i` (Box–Muller on two independent uniforms).
pub(crate) fn normal(key: u64, i: u64) -> f64 {
    let (u1, u2) = (uniform01(key, 2 * i), uniform01(key, 2 * i + 1));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The stream key of a named tensor under `seed`.
pub(crate) fn key_of(seed: u64, name: &str) -> u64 {
    name.bytes().fold(mix(seed), |h, b| mix(h ^ b as u64))
}
