//! What the neural engines share: quantitative normalisation, 2.5D slice
//! stacks with defined edge handling, batching, and the map back to Bq/ml.
//! A backend (tract, ONNX Runtime) only runs one batch.

use super::Volume;
use super::model::ModelPackage;

/// One inference call: `input` is `[b, c, h, w]` contiguous f32; the result
/// must be `[b, 1, h, w]`.
pub trait Backend: Send + Sync {
    fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String>;
    /// The output and, for a network with a second output `io.variance`
    /// (σ² of PET90 − output, normalised units²), that too, `[b, 1, h, w]`
    /// each, from one run. A backend that cannot return it gives None.
    fn infer_with_variance(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        Ok((self.infer(input, b, c, h, w)?, None))
    }
}

/// Normalisation scale: the mean of body voxels, where the body is every
/// voxel above `fraction` × the 99.9th percentile. Invertible (one number per
/// series) and quantitative (it scales with activity, so SUV ratios hold).
pub fn body_scale(v: &Volume, fraction: f64) -> Option<f32> {
    // A strided sample is plenty for a percentile and keeps this O(n/7).
    let threshold = super::texture::body_threshold(&v.data, fraction)?;
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
///
/// A package with a working grid (`io.working_pixel_mm`, optionally
/// `io.working_slice_mm`) is run on it: each slice is resampled to the
/// network's pixel size, its context slices are taken at the network's slice
/// spacing, and the network's change to the slice (output − input, on the
/// working grid) is interpolated back and added to the series' own slice.
/// Detail finer than the working grid is kept as acquired; a series already
/// on the working grid is restored exactly as without it.
///
/// A package with `io.texture` also gets the series' texture descriptors
/// (`texture::describe`, measured once on the whole series) as constant
/// channels after the duration channel.
pub fn restore_volume(v: &Volume, pkg: &ModelPackage, backend: &dyn Backend, workers: usize) -> Result<Volume, String> {
    restore_volume_with_variance(v, pkg, backend, workers).map(|(r, _)| r)
}

/// [`restore_volume`], and for a package with `io.variance` the network's
/// variance output in Bq²/ml² on the series' grid (from the un-flipped
/// pass; on a working grid, interpolated back).
///
/// A package with `[guard]` has its lesion guard applied to the restored
/// image last (`guard::Guard::apply`, each scale in the package's order);
/// the variance is the network's own.
pub fn restore_volume_with_variance(
    v: &Volume,
    pkg: &ModelPackage,
    backend: &dyn Backend,
    workers: usize,
) -> Result<(Volume, Option<Volume>), String> {
    let (mut r, var) = restore_unguarded(v, pkg, backend, workers)?;
    for g in &pkg.guard {
        let t = std::time::Instant::now();
        if let Some(rep) = g.apply(v, &mut r, pkg.normalisation.threshold_fraction) {
            tracing::debug!(
                fwhm_mm = g.fwhm_mm,
                noise = rep.noise,
                changed_share = rep.changed_share,
                ms = t.elapsed().as_millis() as u64,
                "lesion guard applied"
            );
        }
    }
    Ok((r, var))
}

fn restore_unguarded(v: &Volume, pkg: &ModelPackage, backend: &dyn Backend, workers: usize) -> Result<(Volume, Option<Volume>), String> {
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
    let texture = super::texture::describe(v, &pkg.io.texture, pkg.normalisation.threshold_fraction, scale)?;
    let condition = condition.map(|w| [vec![w], texture].concat());
    let grid = WorkingGrid::for_volume(v, pkg);
    if grid.is_native() {
        let (data, var) = run_grid(
            &v.data,
            v.nx,
            v.ny,
            v.nz,
            &|z, j| native_context(z, j, pkg.io.context_slices, v.nz),
            pkg,
            backend,
            workers,
            scale,
            condition,
        )?;
        return Ok((Volume { data, ..v.clone_shape() }, var.map(|data| Volume { data, ..v.clone_shape() })));
    }
    // to the working grid, restore there, and bring the change back
    let plane = v.nx * v.ny;
    let (wx, wy) = (resample_weights(v.nx, grid.nx), resample_weights(v.ny, grid.ny));
    let mut work = Vec::with_capacity(grid.nx * grid.ny * v.nz);
    for z in 0..v.nz {
        work.extend(resample_plane(&v.data[z * plane..(z + 1) * plane], v.nx, v.ny, &wx, &wy));
    }
    let context = |z: usize, j: usize| match grid.slice_step {
        Some(step) => interpolated_context(z, j, pkg.io.context_slices, v.nz, step),
        None => native_context(z, j, pkg.io.context_slices, v.nz),
    };
    let (mut change, var) = run_grid(&work, grid.nx, grid.ny, v.nz, &context, pkg, backend, workers, scale, condition)?;
    for (c, x) in change.iter_mut().zip(&work) {
        *c -= x;
    }
    drop(work);
    let (bx, by) = (resample_weights(grid.nx, v.nx), resample_weights(grid.ny, v.ny));
    let wplane = grid.nx * grid.ny;
    let mut data = v.data.clone();
    for z in 0..v.nz {
        let back = resample_plane(&change[z * wplane..(z + 1) * wplane], grid.nx, grid.ny, &bx, &by);
        for (d, c) in data[z * plane..(z + 1) * plane].iter_mut().zip(back) {
            *d += c;
        }
    }
    let var = var.map(|var| {
        let mut data = Vec::with_capacity(v.data.len());
        for z in 0..v.nz {
            data.extend(resample_plane(&var[z * wplane..(z + 1) * wplane], grid.nx, grid.ny, &bx, &by).into_iter().map(|x| x.max(0.0)));
        }
        Volume { data, ..v.clone_shape() }
    });
    Ok((Volume { data, ..v.clone_shape() }, var))
}

/// Where the network runs for one series: its matrix on the working grid
/// and the step (in the series' slices) between context slices.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WorkingGrid {
    nx: usize,
    ny: usize,
    /// None: the series' own neighbours.
    slice_step: Option<f64>,
    native: bool,
}

impl WorkingGrid {
    /// Within 1 % of the working pixel and slice size counts as on the grid.
    fn for_volume(v: &Volume, pkg: &ModelPackage) -> WorkingGrid {
        let native = WorkingGrid { nx: v.nx, ny: v.ny, slice_step: None, native: true };
        let Some(px) = pkg.io.working_pixel_mm else { return native };
        let close = |a: f64, b: f64| (a / b - 1.0).abs() <= 0.01;
        let [sx, sy, sz] = v.spacing;
        let step = pkg.io.working_slice_mm.filter(|s| sz > 0.0 && !close(sz, *s)).map(|s| s / sz);
        if close(sx, px) && close(sy, px) && step.is_none() {
            return native;
        }
        let n = |count: usize, mm: f64| ((count as f64 * mm / px).round() as usize).max(1);
        WorkingGrid { nx: n(v.nx, sx), ny: n(v.ny, sy), slice_step: step, native: false }
    }

    fn is_native(&self) -> bool {
        self.native
    }
}

/// Context slice `j` (0..ctx) of output slice `z`: the series' own
/// neighbour, edges repeated. Returned as (lower slice, upper slice, weight
/// of the upper one).
fn native_context(z: usize, j: usize, ctx: usize, nz: usize) -> (usize, usize, f32) {
    let zz = (z + j).saturating_sub(ctx / 2).min(nz - 1);
    (zz, zz, 0.0)
}

/// Context slice `j` of output slice `z` at `step` series slices per
/// network slice: linear interpolation between the two series slices
/// around it, clamped to the first and last slice.
fn interpolated_context(z: usize, j: usize, ctx: usize, nz: usize, step: f64) -> (usize, usize, f32) {
    let at = (z as f64 + (j as f64 - (ctx / 2) as f64) * step).clamp(0.0, (nz - 1) as f64);
    let lo = at.floor() as usize;
    let hi = (lo + 1).min(nz - 1);
    (lo, hi, (at - lo as f64) as f32)
}

/// Weights of a 1D resampling from `n_in` to `n_out` samples over the same
/// extent (pixel centres at (i + ½)·size): to fewer samples, the area
/// average of the input pixels each output pixel covers; to as many or
/// more, linear interpolation (edges clamped). Each row sums to 1.
fn resample_weights(n_in: usize, n_out: usize) -> Vec<Vec<(usize, f32)>> {
    let r = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|i| {
            if n_in > n_out {
                let (a, b) = (i as f64 * r, (i + 1) as f64 * r);
                let mut row = Vec::new();
                let mut k = a.floor() as usize;
                while (k as f64) < b && k < n_in {
                    let overlap = (b.min(k as f64 + 1.0) - a.max(k as f64)).max(0.0);
                    if overlap > 0.0 {
                        row.push((k, (overlap / r) as f32));
                    }
                    k += 1;
                }
                row
            } else {
                let c = ((i as f64 + 0.5) * r - 0.5).clamp(0.0, (n_in - 1) as f64);
                let lo = c.floor() as usize;
                let hi = (lo + 1).min(n_in - 1);
                let t = (c - lo as f64) as f32;
                if hi == lo || t == 0.0 { vec![(lo, 1.0)] } else { vec![(lo, 1.0 - t), (hi, t)] }
            }
        })
        .collect()
}

/// Separable resampling of one `w`×`h` plane with the given x and y weights.
fn resample_plane(src: &[f32], w: usize, h: usize, wx: &[Vec<(usize, f32)>], wy: &[Vec<(usize, f32)>]) -> Vec<f32> {
    let ow = wx.len();
    let mut rows = vec![0.0f32; ow * h];
    for y in 0..h {
        let s = &src[y * w..(y + 1) * w];
        for (x, ws) in wx.iter().enumerate() {
            rows[y * ow + x] = ws.iter().map(|&(k, t)| s[k] * t).sum();
        }
    }
    let mut out = vec![0.0f32; ow * wy.len()];
    for (y, ws) in wy.iter().enumerate() {
        let d = &mut out[y * ow..(y + 1) * ow];
        for &(k, t) in ws {
            for (o, r) in d.iter_mut().zip(&rows[k * ow..(k + 1) * ow]) {
                *o += r * t;
            }
        }
    }
    out
}

/// Run the network over every slice of `data` (`nz` planes of `w`×`h`),
/// context slices from `context(z, j)`, and return the output in Bq/ml and,
/// for a package with `io.variance`, the variance output in Bq²/ml².
#[allow(clippy::too_many_arguments)]
fn run_grid(
    data: &[f32],
    w: usize,
    h: usize,
    nz: usize,
    context: &(dyn Fn(usize, usize) -> (usize, usize, f32) + Sync),
    pkg: &ModelPackage,
    backend: &dyn Backend,
    workers: usize,
    scale: f32,
    condition: Option<Vec<f32>>,
) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
    // padded plane (edge replicate), cropped back after inference
    let m = pkg.io.pad_multiple.max(1);
    let (hp, wp) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
    let plane = h * w;
    let pplane = hp * wp;
    let ctx = pkg.io.context_slices;
    let c = pkg.input_channels();
    let inv = 1.0 / scale;
    let batch = pkg.io.batch;
    let n_batches = nz.div_ceil(batch);
    let want_var = pkg.io.variance.is_some();
    let mut out = vec![0.0f32; data.len()];
    let mut var_out = vec![0.0f32; if want_var { data.len() } else { 0 }];
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slice = |z: usize| &data[z * plane..(z + 1) * plane];
    let crop = |y: Vec<f32>, b: usize| -> Vec<f32> {
        if (hp, wp) == (h, w) {
            return y;
        }
        let mut cropped = Vec::with_capacity(b * plane);
        for i in 0..b {
            for yy in 0..h {
                let at = i * pplane + yy * wp;
                cropped.extend_from_slice(&y[at..at + w]);
            }
        }
        cropped
    };
    let run_one = |k: usize| -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
        let start = k * batch;
        let b = batch.min(nz - start);
        let mut input = vec![0.0f32; b * c * pplane];
        for i in 0..b {
            let z = start + i;
            for j in 0..ctx {
                let (lo, hi, t) = context(z, j);
                let (a, bb) = (slice(lo), slice(hi));
                let dst = &mut input[(i * c + j) * pplane..(i * c + j + 1) * pplane];
                for y in 0..hp {
                    let yy = y.min(h - 1) * w;
                    let (ra, rb) = (&a[yy..yy + w], &bb[yy..yy + w]);
                    let drow = &mut dst[y * wp..(y + 1) * wp];
                    for (x, d) in drow.iter_mut().enumerate() {
                        let x = x.min(w - 1);
                        *d = if t == 0.0 { ra[x] } else { ra[x] + t * (rb[x] - ra[x]) } * inv;
                    }
                }
            }
            for (k, value) in condition.iter().flatten().enumerate() {
                input[(i * c + ctx + k) * pplane..(i * c + ctx + k + 1) * pplane].fill(*value);
            }
        }
        let (y, var) = infer_tta(backend, &input, b, c, hp, wp, pkg.io.tta, want_var)?;
        for (what, v) in [("value", Some(&y)), ("variance", var.as_ref())] {
            if let Some(bad) = v.and_then(|v| v.iter().position(|x| !x.is_finite())) {
                return Err(format!("model returned a non-finite {what} at slice {}", start + bad / pplane));
            }
        }
        Ok((crop(y, b), var.map(|v| crop(v, b))))
    };
    let chunks: Vec<&mut [f32]> = out.chunks_mut(batch * plane).collect();
    let slots: Vec<std::sync::Mutex<&mut [f32]>> = chunks.into_iter().map(std::sync::Mutex::new).collect();
    let var_slots: Vec<std::sync::Mutex<&mut [f32]>> = var_out.chunks_mut(batch * plane).map(std::sync::Mutex::new).collect();
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
                        Ok((y, var)) => {
                            let mut slot = slots[k].lock().expect("output slot");
                            for (d, s) in slot.iter_mut().zip(&y) {
                                *d = s * scale;
                            }
                            if let Some(var) = var {
                                let mut slot = var_slots[k].lock().expect("variance slot");
                                for (d, s) in slot.iter_mut().zip(&var) {
                                    *d = s.max(0.0) * scale * scale;
                                }
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
    drop(var_slots);
    if let Some(e) = first_error.into_inner().expect("error slot") {
        return Err(e);
    }
    Ok((out, want_var.then_some(var_out)))
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
/// is 2 to 4: the mean of the outputs for the input as is, then flipped
/// left-right (2), up-down (3) and both (4); each output flipped back
/// first. With `want_var` the network's variance output too, from the
/// un-flipped pass alone: the pass its head was trained on, and the
/// flipped passes need not compute it (both engines run them on the graph
/// cut to R's output).
#[allow(clippy::too_many_arguments)]
fn infer_tta(
    backend: &dyn Backend,
    input: &[f32],
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    tta: usize,
    want_var: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
    let check = |y: Vec<f32>| -> Result<Vec<f32>, String> {
        if y.len() != b * h * w {
            return Err(format!("model returned {} values for a batch of {b} slices of {h}x{w}; expected {}", y.len(), b * h * w));
        }
        Ok(y)
    };
    let (mut acc, var) = if want_var {
        match backend.infer_with_variance(input, b, c, h, w)? {
            (y, Some(v)) => (check(y)?, Some(check(v)?)),
            (_, None) => return Err("the model package names a variance output (io.variance) and this engine returned none".into()),
        }
    } else {
        (check(backend.infer(input, b, c, h, w)?)?, None)
    };
    if tta <= 1 {
        return Ok((acc, var));
    }
    let flips = &[(true, false), (false, true), (true, true)][..tta.min(4) - 1];
    for &(lr, ud) in flips {
        let y = check(backend.infer(&flip_planes(input, h, w, lr, ud), b, c, h, w)?)?;
        for (a, v) in acc.iter_mut().zip(flip_planes(&y, h, w, lr, ud)) {
            *a += v;
        }
    }
    let n = 1.0 / (flips.len() + 1) as f32;
    acc.iter_mut().for_each(|a| *a *= n);
    Ok((acc, var))
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
        let off = infer_tta(&Ramp, &input, 1, 1, h, w, 1, false).unwrap().0;
        assert_eq!(off, vec![0.0, 11.0, 22.0, 30.0, 41.0, 52.0]);
        for tta in [2, 4] {
            let on = infer_tta(&Ramp, &input, 1, 1, h, w, tta, false).unwrap().0;
            for (o, i) in on.iter().zip(&input) {
                assert!((o - (i + 1.0)).abs() < 1e-5, "tta {tta}: {on:?}");
            }
        }
        // an up-down flip alone is not one of tta 2's: a backend that adds the
        // row index keeps it with tta 2 and averages it to (h-1)/2 with tta 4
        struct Rows;
        impl Backend for Rows {
            fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
                let p = h * w;
                Ok((0..b).flat_map(|i| (0..p).map(move |k| input[(i * c + c / 2) * p + k] + (k / w) as f32)).collect())
            }
        }
        let two = infer_tta(&Rows, &input, 1, 1, h, w, 2, false).unwrap().0;
        assert_eq!(two, vec![0.0, 10.0, 20.0, 31.0, 41.0, 51.0]);
        let four = infer_tta(&Rows, &input, 1, 1, h, w, 4, false).unwrap().0;
        for (o, i) in four.iter().zip(&input) {
            assert!((o - (i + 0.5)).abs() < 1e-5, "{four:?}");
        }
        // three: as is, left-right (row kept), up-down (row mirrored): rows
        // average to (2r + (h-1-r)) / 3, the ramp's columns to (2x + (w-1-x)) / 3
        let three = infer_tta(&Rows, &input, 1, 1, h, w, 3, false).unwrap().0;
        assert_eq!(three.iter().map(|v| (v * 3.0).round()).collect::<Vec<_>>(), vec![1.0, 31.0, 61.0, 92.0, 122.0, 152.0]);
        // through a whole volume (padding, batches, edges)
        let mut pkg = pkg();
        pkg.io.tta = 4;
        let v = vol();
        let r = restore_volume(&v, &pkg, &Centre, 2).unwrap();
        for (a, b) in r.data.iter().zip(&v.data) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "an equivariant backend is unchanged by TTA");
        }
    }

    /// The centre channel, and as variance (column + 1): not flip-equivariant.
    /// Counts the runs with and without the variance.
    #[derive(Default)]
    struct CentreVar {
        plain: std::sync::atomic::AtomicUsize,
        with_var: std::sync::atomic::AtomicUsize,
    }
    impl Backend for CentreVar {
        fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
            self.plain.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Centre.infer(input, b, c, h, w)
        }
        fn infer_with_variance(
            &self,
            input: &[f32],
            b: usize,
            c: usize,
            h: usize,
            w: usize,
        ) -> Result<(Vec<f32>, Option<Vec<f32>>), String> {
            self.with_var.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let var = (0..b * h * w).map(|k| (k % w) as f32 + 1.0).collect();
            Ok((Centre.infer(input, b, c, h, w)?, Some(var)))
        }
    }

    #[test]
    fn the_variance_output_comes_back_in_bq2_from_the_unflipped_pass() {
        use std::sync::atomic::Ordering::Relaxed;
        let v = vol();
        let mut pkg = pkg();
        pkg.io.variance = Some("variance".into());
        let scale = body_scale(&v, pkg.normalisation.threshold_fraction).unwrap();
        for tta in [1, 2, 3, 4] {
            pkg.io.tta = tta;
            let backend = CentreVar::default();
            let (r, var) = restore_volume_with_variance(&v, &pkg, &backend, 2).unwrap();
            let var = var.expect("a package with io.variance gets its variance");
            for (a, b) in r.data.iter().zip(&v.data) {
                assert!((a - b).abs() < 1e-3 * b.abs().max(1.0));
            }
            // one run with the variance per batch; the flipped passes without it
            let (with_var, plain) = (backend.with_var.load(Relaxed), backend.plain.load(Relaxed));
            assert!(with_var > 0, "tta {tta}");
            assert_eq!(plain, (tta - 1) * with_var, "tta {tta}");
            // the un-flipped pass's variance, column x of the network's output
            for (k, got) in var.data.iter().enumerate() {
                let want = ((k % v.nx) + 1) as f32;
                assert!(
                    (got - want * scale * scale).abs() <= 1e-4 * want * scale * scale,
                    "tta {tta}, voxel {k}: {got} vs {}",
                    want * scale * scale
                );
            }
        }
        // without the package asking, none is computed; an engine that cannot give it is refused
        pkg.io.variance = None;
        assert!(restore_volume_with_variance(&v, &pkg, &CentreVar::default(), 2).unwrap().1.is_none());
        pkg.io.variance = Some("variance".into());
        let err = restore_volume_with_variance(&v, &pkg, &Centre, 2).unwrap_err();
        assert!(err.contains("io.variance"), "{err}");
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
    fn a_package_guard_gives_back_a_flattened_hot_spot() {
        // a uniform series with a hot 3³ cube, and a network that clips
        // everything above 1.5 × the body mean: it erases the cube
        struct Clip;
        impl Backend for Clip {
            fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
                let p = h * w;
                Ok((0..b)
                    .flat_map(|i| input[(i * c + c / 2) * p..(i * c + c / 2 + 1) * p].iter().map(|x| x.min(1.5)).collect::<Vec<_>>())
                    .collect())
            }
        }
        let n = 12;
        let hot = |i: usize| (4..7).contains(&(i / (n * n))) && (4..7).contains(&(i / n % n)) && (4..7).contains(&(i % n));
        let v = Volume {
            nx: n,
            ny: n,
            nz: n,
            spacing: [1.0; 3],
            data: (0..n * n * n).map(|i| if hot(i) { 3000.0 } else { 1000.0 }).collect(),
            frame_duration_s: None,
        };
        let cube = |r: &Volume| (0..r.data.len()).filter(|&i| hot(i)).map(|i| r.data[i] as f64).sum::<f64>() / 27.0;
        let mut p = pkg();
        let plain = restore_volume(&v, &p, &Clip, 1).unwrap();
        p.guard = vec![super::super::guard::Guard { fwhm_mm: 1.0, z: 1.0, power: 1.0 }];
        let guarded = restore_volume(&v, &p, &Clip, 1).unwrap();
        assert!(cube(&plain) < 1600.0, "{}", cube(&plain));
        assert!(cube(&guarded) > 2700.0, "guarded cube {} Bq/ml of 3000", cube(&guarded));
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

    /// Adds a constant (in normalised units) to the centre slice.
    struct Plus(f32);
    impl Backend for Plus {
        fn infer(&self, input: &[f32], b: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>, String> {
            let p = h * w;
            Ok((0..b)
                .flat_map(|i| input[(i * c + c / 2) * p..(i * c + c / 2 + 1) * p].iter().map(|x| x + self.0).collect::<Vec<_>>())
                .collect())
        }
    }

    fn fine_volume() -> Volume {
        // 2 mm pixels, 2 mm slices: far from a 4.6875 mm / 3.27 mm grid
        let (nx, ny, nz) = (30, 22, 9);
        let data = (0..nx * ny * nz).map(|i| 40.0 + ((i * 7919) % 61) as f32 + 10.0 * (i / (nx * ny)) as f32).collect();
        Volume { nx, ny, nz, spacing: [2.0, 2.0, 2.0], data, frame_duration_s: None }
    }

    #[test]
    fn resampling_weights_keep_the_mean_and_the_identity() {
        for (a, b) in [(300, 128), (128, 300), (144, 123), (7, 7), (5, 1), (1, 4)] {
            let w = resample_weights(a, b);
            assert_eq!(w.len(), b);
            for row in &w {
                let sum: f32 = row.iter().map(|(_, t)| t).sum();
                assert!((sum - 1.0).abs() < 1e-5, "{a}->{b}: {row:?}");
                assert!(row.iter().all(|(k, t)| *k < a && *t > 0.0));
            }
        }
        assert!(resample_weights(6, 6).iter().enumerate().all(|(i, r)| r == &vec![(i, 1.0)]));
        // area average to half: pairs
        let src: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let down = resample_plane(&src, 8, 1, &resample_weights(8, 4), &resample_weights(1, 1));
        assert_eq!(down, vec![0.5, 2.5, 4.5, 6.5]);
        // linear up: the centres of 2 pixels over 4
        let up = resample_plane(&[0.0, 4.0], 2, 1, &resample_weights(2, 4), &resample_weights(1, 1));
        assert_eq!(up, vec![0.0, 1.0, 3.0, 4.0]);
    }

    #[test]
    fn context_slices_are_taken_at_the_working_spacing() {
        // 2 mm series slices, 3.27 mm network slices: step 1.635
        let step = 3.27 / 2.0;
        let (lo, hi, t) = interpolated_context(4, 0, 5, 9, step);
        assert_eq!((lo, hi), (0, 1));
        assert!((t - 0.73).abs() < 1e-4, "{t}");
        assert_eq!(interpolated_context(4, 2, 5, 9, step), (4, 5, 0.0));
        let (lo, hi, t) = interpolated_context(4, 3, 5, 9, step);
        assert_eq!((lo, hi), (5, 6));
        assert!((t - 0.635).abs() < 1e-4);
        // edges clamp to the first and last slice
        assert_eq!(interpolated_context(0, 0, 5, 9, step), (0, 1, 0.0));
        assert_eq!(interpolated_context(8, 4, 5, 9, step), (8, 8, 0.0));
        assert_eq!(native_context(0, 0, 5, 9), (0, 0, 0.0));
        assert_eq!(native_context(8, 4, 5, 9), (8, 8, 0.0));
    }

    #[test]
    fn on_a_working_grid_an_identity_network_changes_nothing() {
        let mut pkg = pkg();
        pkg.io.working_pixel_mm = Some(4.6875);
        pkg.io.working_slice_mm = Some(3.27);
        let v = fine_volume();
        assert!(!WorkingGrid::for_volume(&v, &pkg).is_native());
        for workers in [1, 3] {
            let r = restore_volume(&v, &pkg, &Centre, workers).unwrap();
            assert_eq!((r.nx, r.ny, r.nz, r.spacing), (v.nx, v.ny, v.nz, v.spacing));
            for (a, b) in r.data.iter().zip(&v.data) {
                assert!((a - b).abs() < 1e-4 * b.abs(), "{a} vs {b}: detail finer than the grid must be kept");
            }
        }
        // a uniform change on the working grid is a uniform change on the series
        let scale = body_scale(&v, pkg.normalisation.threshold_fraction).unwrap();
        let r = restore_volume(&v, &pkg, &Plus(0.25), 2).unwrap();
        for (a, b) in r.data.iter().zip(&v.data) {
            assert!((a - b - 0.25 * scale).abs() < 1e-3 * scale, "{a} vs {b}");
        }
    }

    #[test]
    fn a_series_on_the_working_grid_is_restored_as_without_one() {
        let mut pkg = pkg();
        let mut v = vol();
        v.spacing = [4.6875, 4.6875, 3.27];
        let plain = restore_volume(&v, &pkg, &Ramp, 2).unwrap();
        pkg.io.working_pixel_mm = Some(4.6875);
        pkg.io.working_slice_mm = Some(3.27);
        assert!(WorkingGrid::for_volume(&v, &pkg).is_native());
        assert_eq!(restore_volume(&v, &pkg, &Ramp, 2).unwrap().data, plain.data);
        // only the slices differ: the in-plane grid is kept, the context interpolated
        v.spacing[2] = 2.0;
        let g = WorkingGrid::for_volume(&v, &pkg);
        assert_eq!((g.nx, g.ny, g.native), (v.nx, v.ny, false));
        assert!((g.slice_step.unwrap() - 1.635).abs() < 1e-9);
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
