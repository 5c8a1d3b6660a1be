//! What the neural engines share: quantitative normalisation, 2.5D slice
//! stacks with defined edge handling, batching, and the map back to Bq/ml.
//! A backend (tract, ONNX Runtime) only runs one batch.

use super::Volume;
use super::model::ModelPackage;

/// One inference call: `input` is `[b, c, h, w]` contiguous f32; the result
/// must be `[b, 1, h, w]`.
pub trait Backend: Send + Sync {
    fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String>;
}

/// Normalisation scale: the mean of body voxels, where the body is every
/// voxel above `fraction` × the 99.9th percentile. Invertible (one number per
/// series) and quantitative (it scales with activity, so SUV ratios hold).
pub fn body_scale(v: &Volume, fraction: f64) -> Option<f32> {
    // A strided sample is plenty for a percentile and keeps this O(n/7).
    let mut sample: Vec<f32> = v.data.iter().step_by(7).copied().filter(|x| x.is_finite()).collect();
    if sample.is_empty() {
        return None;
    }
    let k = ((sample.len() as f64 * 0.999) as usize).min(sample.len() - 1);
    let (_, p999, _) = sample.select_nth_unstable_by(k, f32::total_cmp);
    let threshold = *p999 as f64 * fraction;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for x in &v.data {
        if (*x as f64) > threshold {
            sum += *x as f64;
            n += 1;
        }
    }
    (n > 0 && sum > 0.0).then(|| (sum / n as f64) as f32)
}

/// Prove a backend runs the package's network: one 16×16 batch of one
/// slice, shaped as the package says. Engines call it from `check`.
pub fn smoke_test(backend: &dyn Backend, pkg: &ModelPackage) -> Result<(), String> {
    let c = pkg.input_channels();
    let y =
        backend.infer(&vec![0.5; c * 16 * 16], 1, c, 16, 16).map_err(|e| format!("model {} does not run: {e}", pkg.onnx_path.display()))?;
    if y.len() != 16 * 16 {
        return Err(format!("model {} returned {} values for one 16x16 slice", pkg.onnx_path.display(), y.len()));
    }
    Ok(())
}

/// Restore a volume slice by slice with 2.5D context. At the first and last
/// slices the missing neighbours repeat the edge slice (replicate padding).
/// `workers` threads each take whole batches (data parallelism: for a
/// backend whose calls can run concurrently, e.g. tract's plans).
pub fn restore_volume(v: &Volume, pkg: &ModelPackage, backend: &dyn Backend, workers: usize) -> Result<Volume, String> {
    let scale = body_scale(v, pkg.normalisation.threshold_fraction).ok_or("the volume holds no activity")?;
    let condition = match pkg.io.condition.as_deref() {
        None => None,
        Some(_) => {
            let d = v.frame_duration_s.ok_or("the model is conditioned on frame duration and the series has none")?;
            let [lo, hi] = pkg.selection.frame_durations_s;
            if !(lo..=hi).contains(&d) {
                return Err(format!("frame duration {d:.1} s is outside the {lo:.0}–{hi:.0} s the model was trained for"));
            }
            Some((d / 90.0) as f32)
        }
    };
    let (h, w, nz) = (v.ny, v.nx, v.nz);
    // padded plane (edge replicate), cropped back after inference
    let m = pkg.io.pad_multiple.max(1);
    let (hp, wp) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
    let plane = h * w;
    let pplane = hp * wp;
    let ctx = pkg.io.context_slices;
    let c = pkg.input_channels();
    let half = ctx / 2;
    let inv = 1.0 / scale;
    let batch = pkg.io.batch;
    let n_batches = nz.div_ceil(batch);
    let mut out = vec![0.0f32; v.data.len()];
    let next = std::sync::atomic::AtomicUsize::new(0);
    let run_one = |k: usize| -> Result<Vec<f32>, String> {
        let start = k * batch;
        let b = batch.min(nz - start);
        let mut input = vec![0.0f32; b * c * pplane];
        for i in 0..b {
            let z = start + i;
            for j in 0..ctx {
                let zz = (z + j).saturating_sub(half).min(nz - 1);
                let src = v.slice(zz);
                let dst = &mut input[(i * c + j) * pplane..(i * c + j + 1) * pplane];
                for y in 0..hp {
                    let row = &src[y.min(h - 1) * w..(y.min(h - 1) + 1) * w];
                    let drow = &mut dst[y * wp..(y + 1) * wp];
                    for (x, d) in drow.iter_mut().enumerate() {
                        *d = row[x.min(w - 1)] * inv;
                    }
                }
            }
            if let Some(value) = condition {
                input[(i * c + ctx) * pplane..(i * c + ctx + 1) * pplane].fill(value);
            }
        }
        let y = infer_tta(backend, &input, b, c, hp, wp, pkg.io.tta)?;
        if let Some(bad) = y.iter().position(|x| !x.is_finite()) {
            return Err(format!("model returned a non-finite value at slice {}", start + bad / pplane));
        }
        if (hp, wp) == (h, w) {
            return Ok(y);
        }
        let mut cropped = Vec::with_capacity(b * plane);
        for i in 0..b {
            for yy in 0..h {
                let at = i * pplane + yy * wp;
                cropped.extend_from_slice(&y[at..at + w]);
            }
        }
        Ok(cropped)
    };
    let chunks: Vec<&mut [f32]> = out.chunks_mut(batch * plane).collect();
    let slots: Vec<std::sync::Mutex<&mut [f32]>> = chunks.into_iter().map(std::sync::Mutex::new).collect();
    let first_error: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..workers.clamp(1, n_batches.max(1)) {
            sc.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= n_batches || first_error.lock().expect("error slot").is_some() {
                        return;
                    }
                    match run_one(k) {
                        Ok(y) => {
                            let mut slot = slots[k].lock().expect("output slot");
                            for (d, s) in slot.iter_mut().zip(&y) {
                                *d = s * scale;
                            }
                        }
                        Err(e) => {
                            first_error.lock().expect("error slot").get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    drop(slots);
    if let Some(e) = first_error.into_inner().expect("error slot") {
        return Err(e);
    }
    Ok(Volume { data: out, ..v.clone_shape() })
}

/// Flip every `h`×`w` plane of `data` left-right and/or up-down (its own
/// inverse).
fn flip_planes(data: &[f32], h: usize, w: usize, lr: bool, ud: bool) -> Vec<f32> {
    let plane = h * w;
    let mut out = vec![0.0f32; data.len()];
    for (src, dst) in data.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
        for y in 0..h {
            let sy = if ud { h - 1 - y } else { y };
            let srow = &src[sy * w..(sy + 1) * w];
            let drow = &mut dst[y * w..(y + 1) * w];
            if lr {
                for (d, s) in drow.iter_mut().zip(srow.iter().rev()) {
                    *d = *s;
                }
            } else {
                drow.copy_from_slice(srow);
            }
        }
    }
    out
}

/// One batch through the backend, with test-time augmentation when `tta`
/// is 4: the mean of the outputs for the input as is and flipped left-right,
/// up-down and both (each output flipped back first).
fn infer_tta(backend: &dyn Backend, input: &[f32], b: usize, c: usize, h: usize, w: usize, tta: usize) -> Result<Vec<f32>, String> {
    let check = |y: Vec<f32>| -> Result<Vec<f32>, String> {
        if y.len() != b * h * w {
            return Err(format!("model returned {} values for a batch of {b} slices of {h}x{w}; expected {}", y.len(), b * h * w));
        }
        Ok(y)
    };
    let mut acc = check(backend.infer(input, b, c, h, w)?)?;
    if tta <= 1 {
        return Ok(acc);
    }
    for (lr, ud) in [(true, false), (false, true), (true, true)] {
        let y = check(backend.infer(&flip_planes(input, h, w, lr, ud), b, c, h, w)?)?;
        for (a, v) in acc.iter_mut().zip(flip_planes(&y, h, w, lr, ud)) {
            *a += v;
        }
    }
    let k = 1.0 / 4.0;
    acc.iter_mut().for_each(|a| *a *= k);
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that returns the centre channel: restoration must then be
    /// the identity, edges included.
    struct Centre;
    impl Backend for Centre {
        fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
            let p = h * w;
            Ok((0..b).flat_map(|i| input[(i * c + c / 2) * p..(i * c + c / 2 + 1) * p].to_vec()).collect())
        }
    }

    /// Returns the first channel: shows which neighbour the edge uses.
    struct First;
    impl Backend for First {
        fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
            let p = h * w;
            Ok((0..b).flat_map(|i| input[(i * c) * p..(i * c + 1) * p].to_vec()).collect())
        }
    }

    fn pkg() -> ModelPackage {
        ModelPackage::load(&std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/test-unet")).unwrap()
    }

    fn vol() -> Volume {
        let (nx, ny, nz) = (4, 3, 7);
        Volume {
            nx,
            ny,
            nz,
            spacing: [1.0; 3],
            data: (0..nx * ny * nz).map(|i| (i / (nx * ny)) as f32 * 100.0 + 50.0).collect(),
            frame_duration_s: None,
        }
    }

    /// Not flip-equivariant: adds the column index to the centre channel.
    struct Ramp;
    impl Backend for Ramp {
        fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
            let p = h * w;
            Ok((0..b).flat_map(|i| (0..p).map(move |k| input[(i * c + c / 2) * p + k] + (k % w) as f32)).collect())
        }
    }

    #[test]
    fn test_time_augmentation_averages_the_flipped_runs() {
        let (h, w) = (2, 3);
        let input: Vec<f32> = (0..h * w).map(|k| 10.0 * k as f32).collect();
        assert_eq!(flip_planes(&flip_planes(&input, h, w, true, true), h, w, true, true), input);
        assert_eq!(flip_planes(&input, h, w, true, false), vec![20.0, 10.0, 0.0, 50.0, 40.0, 30.0]);
        assert_eq!(flip_planes(&input, h, w, false, true), vec![30.0, 40.0, 50.0, 0.0, 10.0, 20.0]);
        // off: the ramp as is; on: x and (w-1-x) averaged to (w-1)/2 = 1
        let off = infer_tta(&Ramp, &input, 1, 1, h, w, 1).unwrap();
        assert_eq!(off, vec![0.0, 11.0, 22.0, 30.0, 41.0, 52.0]);
        let on = infer_tta(&Ramp, &input, 1, 1, h, w, 4).unwrap();
        for (o, i) in on.iter().zip(&input) {
            assert!((o - (i + 1.0)).abs() < 1e-5, "{on:?}");
        }
        // through a whole volume (padding, batches, edges)
        let mut pkg = pkg();
        pkg.io.tta = 4;
        let v = vol();
        let r = restore_volume(&v, &pkg, &Centre, 2).unwrap();
        for (a, b) in r.data.iter().zip(&v.data) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "an equivariant backend is unchanged by TTA");
        }
    }

    #[test]
    fn identity_backend_gives_back_the_input_in_bqml() {
        let v = vol();
        let r = restore_volume(&v, &pkg(), &Centre, 2).unwrap();
        for (a, b) in r.data.iter().zip(&v.data) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0));
        }
    }

    #[test]
    fn edges_repeat_the_first_and_last_slice() {
        let v = vol();
        let r = restore_volume(&v, &pkg(), &First, 1).unwrap();
        // context 5: slice z sees z-2, clamped at 0
        let s = |vol: &Volume, z: usize| vol.slice(z)[0];
        let same = |a: f32, b: f32| assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        same(s(&r, 0), s(&v, 0));
        same(s(&r, 1), s(&v, 0));
        same(s(&r, 2), s(&v, 0));
        same(s(&r, 3), s(&v, 1));
        same(s(&r, 6), s(&v, 4));
        // the last slice's forward neighbours repeat it: check with the last channel
        struct Last;
        impl Backend for Last {
            fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
                let p = h * w;
                Ok((0..b).flat_map(|i| input[(i * c + c - 1) * p..(i * c + c) * p].to_vec()).collect())
            }
        }
        let r = restore_volume(&v, &pkg(), &Last, 3).unwrap();
        same(s(&r, 6), s(&v, 6));
        same(s(&r, 5), s(&v, 6));
        same(s(&r, 4), s(&v, 6));
        same(s(&r, 3), s(&v, 5));
    }

    #[test]
    fn wrong_output_size_is_an_error() {
        struct Short;
        impl Backend for Short {
            fn infer(&self, _: &[f32], _: usize, _: usize, _: usize, _: usize) -> Result<Vec<f32>, String> {
                Ok(vec![0.0; 3])
            }
        }
        assert!(restore_volume(&vol(), &pkg(), &Short, 2).unwrap_err().contains("expected"));
    }
}
