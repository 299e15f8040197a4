//! The randomized Walsh–Hadamard rotation of TurboQuant: `y = D(s2) · H/√n · D(s1) · x` on
//! groups of 64 or 128 values, with the fork's sign diagonals (seed 42; 64-wide groups use the
//! first 64 signs, as the fork's CUDA kernels do). The transform is orthogonal, so
//! `<Rq, Rk> = <q, k>` and its inverse swaps the two diagonals.

const SIGNS1: [i8; 128] = [
    -1, 1, 1, -1, -1, 1, -1, 1, -1, -1, 1, 1, 1, 1, 1, 1, 1, -1, 1, -1, 1, -1, -1, 1, 1, 1, -1, 1,
    1, -1, -1, -1, -1, 1, 1, -1, 1, 1, -1, 1, -1, 1, 1, -1, -1, 1, -1, 1, 1, 1, 1, -1, -1, -1, -1,
    -1, 1, -1, 1, 1, 1, 1, -1, 1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, 1, 1, -1,
    -1, 1, 1, 1, -1, -1, 1, 1, -1, 1, 1, -1, 1, -1, -1, 1, 1, -1, 1, -1, 1, -1, 1, 1, 1, 1, -1, 1,
    -1, 1, 1, -1, 1, 1, -1, -1, -1, -1, -1, 1, 1, -1, 1, 1, -1, 1,
];

const SIGNS2: [i8; 128] = [
    1, 1, 1, 1, -1, 1, 1, -1, 1, -1, -1, -1, 1, -1, -1, -1, 1, 1, -1, -1, 1, -1, 1, -1, 1, -1, -1,
    1, -1, 1, 1, 1, 1, 1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1, 1, 1, 1, -1, 1, -1, 1, 1, 1, -1,
    -1, 1, -1, -1, -1, -1, -1, -1, 1, 1, 1, -1, 1, -1, -1, -1, -1, 1, -1, 1, -1, 1, -1, -1, 1, 1,
    -1, 1, -1, 1, 1, -1, 1, -1, -1, -1, -1, 1, -1, -1, 1, -1, 1, -1, 1, 1, 1, -1, -1, 1, -1, 1, -1,
    1, 1, -1, -1, 1, -1, 1, -1, 1, 1, -1, 1, -1, 1, -1, -1, -1, -1, -1, 1, -1,
];

/// Unnormalized in-place Hadamard butterfly; `x.len()` is a power of two.
fn butterfly(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            let (a, b) = x[i..i + 2 * h].split_at_mut(h);
            for (a, b) in a.iter_mut().zip(b) {
                let (s, d) = (*a + *b, *a - *b);
                *a = s;
                *b = d;
            }
        }
        h *= 2;
    }
}

fn scale(n: usize) -> f32 {
    match n {
        128 => 0.088_388_35,
        64 => 0.125,
        _ => unreachable!("WHT groups are 64 or 128 wide"),
    }
}

/// Rotates one group (64 or 128 values) in place.
pub fn forward(x: &mut [f32]) {
    let n = x.len();
    for (v, &s) in x.iter_mut().zip(&SIGNS1[..n]) {
        *v *= s as f32;
    }
    butterfly(x);
    let k = scale(n);
    for (v, &s) in x.iter_mut().zip(&SIGNS2[..n]) {
        *v *= k * s as f32;
    }
}

/// Undoes [`forward`] on one group.
pub fn inverse(x: &mut [f32]) {
    let n = x.len();
    for (v, &s) in x.iter_mut().zip(&SIGNS2[..n]) {
        *v *= s as f32;
    }
    butterfly(x);
    let k = scale(n);
    for (v, &s) in x.iter_mut().zip(&SIGNS1[..n]) {
        *v *= k * s as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_and_invertible() {
        for n in [64, 128] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.3).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2).collect();
            let (mut ra, mut rb) = (a.clone(), b.clone());
            forward(&mut ra);
            forward(&mut rb);
            let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
            assert!((dot(&a, &b) - dot(&ra, &rb)).abs() < 1e-4);
            inverse(&mut ra);
            for (x, y) in a.iter().zip(&ra) {
                assert!((x - y).abs() < 1e-5);
            }
        }
    }
}
