//! The uncertainty of a restored image: per voxel, the predicted standard
//! deviation σ of PET90 − R, where R is the restored (90 s-equivalent) value
//! and PET90 the image a standard 90 s acquisition of the same bed would
//! have given.
//!
//! Where it comes from (docs/QUALITY.md "Uncertainty"): for a short frame x
//! of duration t nested in the 90 s acquisition, w = t / 90 s, the restored
//! image is R = w·x + (1 − w)·den, and PET90 ≈ w·x + (1 − w)·y with y the
//! image of the other (90 − t) s, whose noise is independent of x's. So
//! PET90 − R = (1 − w)·(y − den): the noise of y, whose variance is
//! w / (1 − w) times x's, plus the denoiser's own error. x's local noise
//! power is read from the residual x − R = (1 − w)·(x − den), averaged over
//! a window of a few millimetres. Together:
//!
//! noise term: N = w / (1 − w) · G ∗ (x − R)²
//!
//! That term misses the denoiser's own error, which is largest where the
//! network removes too little noise (counts or reconstructions it was not
//! trained on): there the residual is small and the noise stays in R. The
//! second term reads that from R's own fine texture, R minus R smoothed
//! (a Gaussian of `texture_mm`), weighted by (1 − w)² as the denoiser's
//! share of R:
//!
//! texture term: T = (1 − w)² · G ∗ (R − G_t ∗ R)²
//!
//! σ² = a · N + b · T, with one (a, b) per intensity class of R, fitted on
//! the validation grid by `petlab calibrate` (maximum likelihood, then a
//! scale that makes R ± σ hold PET90 in 68.3 % of the voxels) and stored in
//! the model package's `[uncertainty]` table. Both terms grow wherever the
//! input is noisier than usual (low counts, a shorter frame) or the network
//! departs from it, so σ grows there too. Any engine's output can be given
//! a σ this way; only a calibrated model's is written out.
//!
//! One set of class weights cannot fit every reconstruction: the denoiser's
//! error depends on how the scanner filtered the image, which neither term
//! sees. A calibration may therefore also name texture descriptors of the
//! input frame (`descriptors`, measured as the engines measure them for the
//! network, `restore::texture`) and scale σ² per frame by
//! exp(c₀ + Σ cⱼ·tⱼ) (`descriptor_coef`), fitted by `petlab calibrate
//! --descriptors` on the same grid.

use super::Volume;

/// FWHM (mm) of the window the residual's power is averaged over.
pub const DEFAULT_WINDOW_MM: f64 = 10.0;
/// FWHM (mm) of the smoothing R's texture is measured against.
pub const DEFAULT_TEXTURE_MM: f64 = 6.0;
/// Upper edges of the intensity classes, in units of R's body mean: lungs
/// and air, soft tissue, warm organs, hot organs and lesions.
pub const DEFAULT_CLASS_EDGES: [f64; 3] = [0.5, 1.5, 3.0];
pub const CLASS_NAMES: [&str; 4] = ["low", "body", "warm", "hot"];

/// The `[uncertainty]` table of a model package.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// FWHM (mm) of the window both terms are averaged over.
    pub window_mm: f64,
    /// FWHM (mm) of the smoothing the texture term is measured against.
    pub texture_mm: f64,
    /// Upper edges of the intensity classes (R ÷ body mean of R), ascending.
    pub class_edges: Vec<f64>,
    /// Weight of the noise term per class (`class_edges.len() + 1` values).
    pub noise: Vec<f64>,
    /// Weight of the texture term per class.
    pub texture: Vec<f64>,
    /// What the scales were fitted on (free text, for the record).
    #[serde(default)]
    pub fitted_on: String,
    /// Texture descriptors of the input frame (names of
    /// `restore::texture::KNOWN`) that scale σ² per frame; empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptors: Vec<String>,
    /// c₀, then one cⱼ per descriptor: σ² ·= exp(c₀ + Σ cⱼ·tⱼ).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub descriptor_coef: Vec<f64>,
    /// Weight of the network's own variance output (`io.variance`, a σ
    /// head trained by likelihood) per class; empty: the package has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub head: Vec<f64>,
    /// A site's own factor on σ per class ([`SiteCalibration`]), set from
    /// the configuration, never from the package; empty: none.
    #[serde(skip)]
    pub site_scale: Vec<f64>,
}

/// The per-frame exponent is held within ±this, so a frame far outside
/// anything fitted gets a σ at most e³ ≈ 20 times larger or smaller in
/// variance, never an infinite one.
pub const MAX_LOG_FRAME_SCALE: f64 = 3.0;

/// Why σ cannot be computed, or a calibration is not usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UncertaintyError {
    #[error("the restored volume does not have the input's shape")]
    Shape,
    #[error("the input's frame duration is not known")]
    NoDuration,
    #[error("a frame of {0} s is not shorter than the 90 s standard: no uncertainty to predict")]
    NotShort(f64),
    #[error("{0}")]
    Calibration(String),
    #[error("the model's σ comes from its variance output, which the engine did not return")]
    NoVariance,
}

impl Calibration {
    /// Identity of this calibration as applied (every field, a site's
    /// factor included): the first 12 hex digits of the sha256 of its
    /// debug form. It salts the uncertainty series' UIDs, since editing
    /// `[uncertainty]` or a site factor changes σ without changing the model.
    pub fn id(&self) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(format!("{self:?}").as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
    }

    pub fn check(&self) -> Result<(), UncertaintyError> {
        self.check_text().map_err(UncertaintyError::Calibration)
    }

    fn check_text(&self) -> Result<(), String> {
        for (key, v) in [("window_mm", self.window_mm), ("texture_mm", self.texture_mm)] {
            if !(v > 0.0 && v <= 50.0) {
                return Err(format!("uncertainty.{key} must be in (0, 50], is {v}"));
            }
        }
        if self.class_edges.windows(2).any(|w| w[0] >= w[1]) || self.class_edges.iter().any(|e| !(e.is_finite() && *e > 0.0)) {
            return Err(format!("uncertainty.class_edges must be positive and ascending, are {:?}", self.class_edges));
        }
        for (key, v) in [("noise", &self.noise), ("texture", &self.texture)] {
            if v.len() != self.class_edges.len() + 1 {
                return Err(format!(
                    "uncertainty.{key} needs {} values (one per class, class_edges.len() + 1), has {}",
                    self.class_edges.len() + 1,
                    v.len()
                ));
            }
            if v.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
                return Err(format!("uncertainty.{key} must be 0 or more, is {v:?}"));
            }
        }
        if !self.head.is_empty() {
            if self.head.len() != self.class_edges.len() + 1 {
                return Err(format!(
                    "uncertainty.head needs {} values (one per class, class_edges.len() + 1), has {}",
                    self.class_edges.len() + 1,
                    self.head.len()
                ));
            }
            if self.head.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
                return Err(format!("uncertainty.head must be 0 or more, is {:?}", self.head));
            }
        }
        let head = |c: usize| self.head.get(c).copied().unwrap_or(0.0);
        if self.noise.iter().zip(&self.texture).enumerate().any(|(c, (a, b))| a + b + head(c) <= 0.0) {
            return Err("uncertainty: every class needs a positive noise, texture or head weight".into());
        }
        if let Some(d) = self.descriptors.iter().find(|d| !super::texture::KNOWN.contains(&d.as_str())) {
            return Err(format!("uncertainty.descriptors: {d:?} is unknown (this build knows {:?})", super::texture::KNOWN));
        }
        let want = if self.descriptors.is_empty() { 0 } else { self.descriptors.len() + 1 };
        if self.descriptor_coef.len() != want {
            return Err(format!(
                "uncertainty.descriptor_coef needs {want} values (c0, then one per descriptor), has {}",
                self.descriptor_coef.len()
            ));
        }
        if self.descriptor_coef.iter().any(|c| !c.is_finite()) {
            return Err(format!("uncertainty.descriptor_coef must be finite, is {:?}", self.descriptor_coef));
        }
        Ok(())
    }

    /// sha256 (hex, first 16 digits) of the calibration as written in the
    /// package (without any site factor): what a site file was measured against.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let text = toml::to_string(self).unwrap_or_default();
        sha2::Sha256::digest(text.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// The factor on σ² for this input frame: exp(c₀ + Σ cⱼ·tⱼ) from its
    /// texture descriptors, 1 for a calibration without descriptors.
    pub fn frame_scale(&self, input: &Volume) -> Result<f64, UncertaintyError> {
        if self.descriptors.is_empty() {
            return Ok(1.0);
        }
        let t = super::texture::describe(input, &self.descriptors, 0.05, body_mean(input)).map_err(UncertaintyError::Calibration)?;
        Ok(log_frame_scale(&self.descriptor_coef, &t.iter().map(|v| *v as f64).collect::<Vec<_>>()).exp())
    }

    /// Does σ need the network's variance output (`io.variance`)?
    pub fn uses_variance(&self) -> bool {
        self.head.iter().any(|h| *h > 0.0)
    }

    /// σ for `restored` from `input` (the short frame, its duration set)
    /// and, for a calibration with head weights, the variance the network
    /// returned with it (Bq²/ml², same shape).
    pub fn sigma(&self, input: &Volume, restored: &Volume, variance: Option<&Volume>) -> Result<Volume, UncertaintyError> {
        let n = input.data.len();
        let variance = match (self.uses_variance(), variance) {
            (false, _) => None,
            (true, None) => return Err(UncertaintyError::NoVariance),
            (true, Some(v)) if v.data.len() != n => return Err(UncertaintyError::Shape),
            (true, Some(v)) => Some(&v.data),
        };
        let analytic = self.noise.iter().chain(&self.texture).any(|w| *w > 0.0);
        let Terms { noise, texture } = if analytic {
            terms(input, restored, self.window_mm, self.texture_mm)?
        } else {
            weight(input, restored)?;
            Terms { noise: vec![0.0; n], texture: vec![0.0; n] }
        };
        let class = classes(restored, &self.class_edges);
        let f = self.frame_scale(input)? as f32;
        let data = (0..n)
            .map(|i| {
                let c = class[i] as usize;
                let site = self.site_scale.get(c).copied().unwrap_or(1.0) as f32;
                let head = variance.map_or(0.0, |v| self.head[c] as f32 * v[i].max(0.0));
                site * (f * (self.noise[c] as f32 * noise[i] + self.texture[c] as f32 * texture[i] + head)).sqrt()
            })
            .collect();
        Ok(Volume { data, ..input.clone_shape() })
    }
}

/// Bins of |PET90 − R| ÷ σ per unit in a [`SiteCalibration`] histogram.
pub const SITE_BINS_PER_UNIT: usize = 40;
/// Ratios from 0 to this many σ are binned; larger ones share the last bin.
pub const SITE_MAX_RATIO: usize = 10;
/// A class with fewer body voxels than this takes the scale of all classes
/// together.
pub const SITE_MIN_VOXELS: u64 = 2000;
/// The nominal coverage of R ± σ.
pub const ONE_SIGMA: f64 = 0.682_689_5;

/// A site's own calibration of σ, from its paired series (a short frame
/// and the standard 90 s frame it is nested in, both reconstructed from
/// the same list-mode data): per intensity class of R, the histogram of
/// |PET90 − R| ÷ σ over body voxels, and the factor on σ that makes
/// R ± σ hold PET90 in 68.3 % of them (a split-conformal quantile). The
/// model's own calibration is fitted on simulated reconstructions; a site
/// whose reconstruction it fits less well measures its own factor with
/// `petrestore eval --site-uncertainty FILE` and names FILE in
/// `restore.uncertainty_site`. Pairs accumulate: each run adds one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteCalibration {
    /// The model (`name@version+sha256-prefix`) whose σ this scales.
    pub model: String,
    /// [`Calibration::fingerprint`] of the σ calibration it was measured
    /// against: a recalibrated package (same network, new `[uncertainty]`)
    /// needs a new file.
    pub calibration: String,
    /// One line per pair that went in: input, reference, durations.
    pub pairs: Vec<String>,
    /// Factor on σ per class of the model's calibration.
    pub scale: Vec<f64>,
    /// Body voxels per class.
    pub voxels: Vec<u64>,
    /// Per class, counts of |PET90 − R| ÷ σ in bins of 1/[`SITE_BINS_PER_UNIT`].
    pub histogram: Vec<Vec<u64>>,
}

impl SiteCalibration {
    pub fn new(model: &str, cal: &Calibration) -> SiteCalibration {
        let bins = SITE_BINS_PER_UNIT * SITE_MAX_RATIO;
        let classes = cal.class_edges.len() + 1;
        SiteCalibration {
            model: model.to_owned(),
            calibration: cal.fingerprint(),
            pairs: Vec::new(),
            scale: vec![1.0; classes],
            voxels: vec![0; classes],
            histogram: vec![vec![0; bins]; classes],
        }
    }

    /// Add one pair: `sigma` the model's σ (without a site scale) for
    /// `restored`, `reference` the standard frame; body voxels are those
    /// the engines normalise by (above 5 % of the 99.9th percentile of R).
    pub fn add(&mut self, cal: &Calibration, restored: &Volume, sigma: &Volume, reference: &Volume, label: &str) {
        let class = classes(restored, &cal.class_edges);
        let t = super::texture::body_threshold(&restored.data, 0.05).unwrap_or(f64::INFINITY);
        let last = SITE_BINS_PER_UNIT * SITE_MAX_RATIO - 1;
        for (((r, s), p), c) in restored.data.iter().zip(&sigma.data).zip(&reference.data).zip(&class) {
            if (*r as f64) <= t || s.is_nan() || *s <= 0.0 || !p.is_finite() {
                continue;
            }
            let z = ((p - r).abs() / s) as f64;
            let c = *c as usize;
            self.histogram[c][((z * SITE_BINS_PER_UNIT as f64) as usize).min(last)] += 1;
            self.voxels[c] += 1;
        }
        self.pairs.push(label.to_owned());
        self.refit();
    }

    /// The scale per class from the histograms.
    fn refit(&mut self) {
        let all: Vec<u64> = (0..self.histogram[0].len()).map(|b| self.histogram.iter().map(|h| h[b]).sum()).collect();
        let pooled = quantile(&all, ONE_SIGMA).unwrap_or(1.0);
        self.scale = self
            .histogram
            .iter()
            .zip(&self.voxels)
            .map(|(h, n)| if *n >= SITE_MIN_VOXELS { quantile(h, ONE_SIGMA).unwrap_or(pooled) } else { pooled })
            .collect();
    }

    /// Share of the body voxels that went in whose PET90 lies within
    /// R ± z·σ·scale (%), all classes together.
    pub fn coverage(&self, z: f64) -> f64 {
        let (mut inside, mut n) = (0.0, 0u64);
        for (h, s) in self.histogram.iter().zip(&self.scale) {
            let edge = z * s * SITE_BINS_PER_UNIT as f64;
            for (b, k) in h.iter().enumerate() {
                // the part of each bin below the edge, as if uniform within it
                inside += *k as f64 * (edge - b as f64).clamp(0.0, 1.0);
                n += k;
            }
        }
        100.0 * inside / n.max(1) as f64
    }

    /// Checks that it belongs to `model` with the calibration `cal` and is
    /// whole; the errors say how to make a new one.
    pub fn check(&self, model: &str, cal: &Calibration) -> Result<(), String> {
        const REFIT: &str = "fit a new file (petrestore eval --model DIR --site-uncertainty NEW_FILE, one run per pair)";
        if self.model != model {
            return Err(format!("it was fitted for model {}, this is {model}: {REFIT}", self.model));
        }
        if self.calibration != cal.fingerprint() {
            return Err(format!(
                "it was fitted against another [uncertainty] calibration of {model} (the package was recalibrated): {REFIT}"
            ));
        }
        let k = cal.class_edges.len() + 1;
        let bins = SITE_BINS_PER_UNIT * SITE_MAX_RATIO;
        if self.scale.len() != k || self.voxels.len() != k || self.histogram.len() != k || self.histogram.iter().any(|h| h.len() != bins) {
            return Err(format!("it is damaged (not {k} classes of {bins} bins each): {REFIT}"));
        }
        if self.scale.iter().any(|s| !(s.is_finite() && *s > 0.0 && *s <= SITE_MAX_RATIO as f64)) {
            return Err(format!("it is damaged (scale must be in (0, {SITE_MAX_RATIO}], is {:?}): {REFIT}", self.scale));
        }
        Ok(())
    }

    pub fn load(path: &std::path::Path) -> Result<SiteCalibration, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| format!("{} is not a site calibration file (petrestore eval --site-uncertainty writes one): {e}", path.display()))
    }

    /// Write atomically: a temporary file beside it, fsync, rename, fsync
    /// of the folder; the temporary file is removed if any step fails.
    pub fn save(&self, path: &std::path::Path) -> Result<(), String> {
        use std::io::Write;
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        let tmp = path.with_extension("toml.tmp");
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("cannot write {}: {e}", path.display()));
        }
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
    }
}

/// The q-quantile of a histogram in bins of 1/[`SITE_BINS_PER_UNIT`],
/// interpolated within its bin; `None` when it is empty.
fn quantile(h: &[u64], q: f64) -> Option<f64> {
    let n: u64 = h.iter().sum();
    if n == 0 {
        return None;
    }
    let want = q * n as f64;
    let mut below = 0.0;
    for (b, k) in h.iter().enumerate() {
        let k = *k as f64;
        if below + k >= want && k > 0.0 {
            return Some((b as f64 + (want - below) / k) / SITE_BINS_PER_UNIT as f64);
        }
        below += k;
    }
    Some(h.len() as f64 / SITE_BINS_PER_UNIT as f64)
}

/// ln of the per-frame factor on σ² for descriptors `t`: c₀ + Σ cⱼ·tⱼ,
/// held within ±[`MAX_LOG_FRAME_SCALE`].
pub fn log_frame_scale(coef: &[f64], t: &[f64]) -> f64 {
    let Some((c0, c)) = coef.split_first() else { return 0.0 };
    (c0 + c.iter().zip(t).map(|(a, b)| a * b).sum::<f64>()).clamp(-MAX_LOG_FRAME_SCALE, MAX_LOG_FRAME_SCALE)
}

/// The two variance terms of the module doc, per voxel (Bq/ml squared).
pub struct Terms {
    pub noise: Vec<f32>,
    pub texture: Vec<f32>,
}

pub fn terms(input: &Volume, restored: &Volume, window_mm: f64, texture_mm: f64) -> Result<Terms, UncertaintyError> {
    let w = weight(input, restored)?;
    let noise = local_power(input, input.data.iter().zip(&restored.data).map(|(x, r)| x - r), window_mm);
    let smooth = super::gaussian::filter(restored, texture_mm);
    let texture = local_power(input, restored.data.iter().zip(&smooth.data).map(|(r, s)| r - s), window_mm);
    let (kn, kt) = ((w / (1.0 - w)) as f32, ((1.0 - w) * (1.0 - w)) as f32);
    Ok(Terms { noise: noise.into_iter().map(|p| kn * p).collect(), texture: texture.into_iter().map(|p| kt * p).collect() })
}

/// G ∗ d² over a window of `window_mm`, for the differences `d`.
fn local_power(shape: &Volume, d: impl Iterator<Item = f32>, window_mm: f64) -> Vec<f32> {
    let sq: Vec<f32> = d.map(|v| v * v).collect();
    let local = super::gaussian::filter(&Volume { data: sq, ..shape.clone_shape() }, window_mm);
    local.data.into_iter().map(|p| p.max(0.0)).collect()
}

/// w = frame duration ÷ 90 s, checked.
fn weight(input: &Volume, restored: &Volume) -> Result<f64, UncertaintyError> {
    if (input.nx, input.ny, input.nz) != (restored.nx, restored.ny, restored.nz) {
        return Err(UncertaintyError::Shape);
    }
    let t = input.frame_duration_s.ok_or(UncertaintyError::NoDuration)?;
    let w = t / 90.0;
    if !(w > 0.0 && w < 1.0) {
        return Err(UncertaintyError::NotShort(t));
    }
    Ok(w)
}

/// sqrt of the noise term alone (see the module doc), in Bq/ml.
pub fn raw_sigma(input: &Volume, restored: &Volume, window_mm: f64) -> Result<Volume, UncertaintyError> {
    let w = weight(input, restored)?;
    let k = (w / (1.0 - w)) as f32;
    let noise = local_power(input, input.data.iter().zip(&restored.data).map(|(x, r)| x - r), window_mm);
    Ok(Volume { data: noise.into_iter().map(|p| (k * p).sqrt()).collect(), ..input.clone_shape() })
}

/// Body mean of `v`: the normalisation of the engines (voxels above 5 % of
/// the 99.9th percentile).
pub fn body_mean(v: &Volume) -> f32 {
    super::neural::body_scale(v, 0.05).unwrap_or(1.0).max(f32::MIN_POSITIVE)
}

/// Intensity class of every voxel of `restored` (index into the scales).
pub fn classes(restored: &Volume, edges: &[f64]) -> Vec<u8> {
    let m = body_mean(restored) as f64;
    restored.data.iter().map(|r| edges.iter().take_while(|e| (*r as f64) / m >= **e).count() as u8).collect()
}

/// The one-line summary of a σ volume for the job record and the fleet.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Mean σ over body voxels ÷ mean R over them (%).
    pub body_relative_sd_pct: f64,
    /// Share of body voxels whose σ exceeds `fraction` of R (%).
    pub uncertain_share_pct: f64,
    /// The fraction used (e.g. 0.25).
    pub fraction: f64,
}

pub fn summarise(restored: &Volume, sigma: &Volume, fraction: f64) -> Summary {
    let t = body_mean(restored) * 0.5;
    let (mut sr, mut ss, mut n, mut over) = (0.0f64, 0.0f64, 0usize, 0usize);
    for (r, s) in restored.data.iter().zip(&sigma.data) {
        if *r > t {
            sr += *r as f64;
            ss += *s as f64;
            n += 1;
            if (*s as f64) > fraction * *r as f64 {
                over += 1;
            }
        }
    }
    Summary {
        body_relative_sd_pct: if sr > 0.0 { 100.0 * ss / sr } else { 0.0 },
        uncertain_share_pct: 100.0 * over as f64 / n.max(1) as f64,
        fraction,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "uncertainty: body σ {:.1} % of the restored value; {:.1} % of body voxels above {:.0} %",
            self.body_relative_sd_pct,
            self.uncertain_share_pct,
            100.0 * self.fraction
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(data: Vec<f32>, n: usize, t: f64) -> Volume {
        Volume { nx: n, ny: n, nz: 1, spacing: [4.0, 4.0, 4.0], data, frame_duration_s: Some(t) }
    }

    #[test]
    fn raw_sigma_follows_the_nesting_formula() {
        // a residual of ±2 everywhere: G ∗ (x − R)² = 4, so σ_raw² = w/(1 − w)·4
        let n = 16;
        let x: Vec<f32> = (0..n * n).map(|i| 10.0 + if i % 2 == 0 { 2.0 } else { -2.0 }).collect();
        let r = vec![10.0f32; n * n];
        for (t, want) in [(30.0, (0.5f32 * 4.0).sqrt()), (60.0, (2.0f32 * 4.0).sqrt())] {
            let s = raw_sigma(&vol(x.clone(), n, t), &vol(r.clone(), n, t), 8.0).unwrap();
            let mid = s.data[n * n / 2 + n / 2];
            assert!((mid - want).abs() < 0.05 * want, "{t} s: {mid} vs {want}");
        }
        // no frame shorter than 90 s, no σ
        assert!(raw_sigma(&vol(x.clone(), n, 90.0), &vol(r.clone(), n, 90.0), 8.0).is_err());
    }

    #[test]
    fn a_noisier_input_gets_a_larger_sigma() {
        let n = 16;
        let r = vec![10.0f32; n * n];
        let noisy = |a: f32| (0..n * n).map(|i| 10.0 + if i % 2 == 0 { a } else { -a }).collect::<Vec<f32>>();
        let s1 = raw_sigma(&vol(noisy(1.0), n, 30.0), &vol(r.clone(), n, 30.0), 8.0).unwrap();
        let s3 = raw_sigma(&vol(noisy(3.0), n, 30.0), &vol(r.clone(), n, 30.0), 8.0).unwrap();
        assert!(s3.data[100] > 2.9 * s1.data[100]);
    }

    /// Default windows and classes, noise weight 1, the given texture
    /// weight, no descriptors.
    fn test_calibration(texture: f64) -> Calibration {
        Calibration {
            window_mm: 10.0,
            texture_mm: 6.0,
            class_edges: DEFAULT_CLASS_EDGES.to_vec(),
            noise: vec![1.0; 4],
            texture: vec![texture; 4],
            fitted_on: String::new(),
            descriptors: Vec::new(),
            descriptor_coef: Vec::new(),
            head: Vec::new(),
            site_scale: Vec::new(),
        }
    }

    #[test]
    fn classes_scales_and_checks() {
        let n = 4;
        let r = vol(vec![0.1, 1.0, 2.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], n, 30.0);
        let c = classes(&r, &DEFAULT_CLASS_EDGES);
        assert_eq!(&c[..4], &[0, 1, 2, 3]);
        let mut cal = test_calibration(0.0);
        assert!(cal.check().is_ok());
        cal.descriptors = vec!["noise_px".into()];
        assert!(cal.check().unwrap_err().to_string().contains("needs 2 values"));
        cal.descriptor_coef = vec![0.5, 1.0];
        assert!(cal.check().is_ok());
        cal.descriptors = vec!["sharpness".into()];
        assert!(cal.check().unwrap_err().to_string().contains("\"sharpness\" is unknown"));
        cal.descriptors.clear();
        assert!(cal.check().unwrap_err().to_string().contains("needs 0 values"));
        cal.descriptor_coef.clear();
        cal.noise.pop();
        assert!(cal.check().unwrap_err().to_string().contains("needs 4 values"));
        cal.noise = vec![1.0, 0.0, 1.0, 1.0];
        assert!(cal.check().unwrap_err().to_string().contains("positive noise, texture or head"));
        // a head weight alone carries a class
        cal.head = vec![1.0; 4];
        assert!(cal.check().is_ok() && cal.uses_variance());
        cal.head = vec![1.0; 3];
        assert!(cal.check().unwrap_err().to_string().contains("uncertainty.head needs 4 values"));
        cal.head = vec![1.0, 1.0, f64::NAN, 1.0];
        assert!(cal.check().unwrap_err().to_string().contains("uncertainty.head must be 0 or more"));
        cal.head.clear();
        cal.texture = vec![0.0, -1.0, 0.0, 0.0];
        assert!(cal.check().is_err());
    }

    #[test]
    fn a_head_calibration_takes_sigma_from_the_networks_variance() {
        let n = 16;
        let input = Volume {
            data: (0..n * n).map(|i| if (i / n) % 15 == 0 { 0.0 } else { 100.0 + (i % 7) as f32 }).collect(),
            nx: n,
            ny: n,
            nz: 1,
            spacing: [4.0, 4.0, 4.0],
            frame_duration_s: Some(30.0),
        };
        let restored = Volume { data: input.data.iter().map(|x| if *x > 0.0 { 103.0 } else { 0.0 }).collect(), ..input.clone_shape() };
        let var = Volume { data: (0..n * n).map(|i| (i % 5) as f32 * 4.0).collect(), ..input.clone_shape() };
        let mut cal = test_calibration(1.0);
        cal.noise = vec![0.0; 4];
        cal.texture = vec![0.0; 4];
        cal.head = vec![1.0, 1.0, 2.25, 4.0];
        assert_eq!(cal.sigma(&input, &restored, None).unwrap_err(), UncertaintyError::NoVariance);
        let short = Volume { data: vec![0.0; 3], ..input.clone_shape() };
        assert_eq!(cal.sigma(&input, &restored, Some(&short)).unwrap_err(), UncertaintyError::Shape);
        let s = cal.sigma(&input, &restored, Some(&var)).unwrap();
        let class = classes(&restored, &cal.class_edges);
        for (i, c) in class.iter().enumerate() {
            let want = (cal.head[*c as usize] as f32 * var.data[i]).sqrt();
            assert!((s.data[i] - want).abs() <= 1e-5 * want.max(1.0), "voxel {i}: {} vs {want}", s.data[i]);
        }
        // a site's factor scales it as it scales the analytic σ, and is
        // part of the calibration's identity (which salts the σ series' UIDs)
        let before = cal.id();
        assert_eq!(before.len(), 12);
        assert_eq!(before, cal.clone().id());
        cal.site_scale = vec![2.0; 4];
        assert_ne!(cal.id(), before);
        let scaled = cal.sigma(&input, &restored, Some(&var)).unwrap();
        assert!(scaled.data.iter().zip(&s.data).all(|(a, b)| (a - 2.0 * b).abs() <= 1e-5 * a.max(1.0)));
        // σ is predicted for short frames only
        let mut long = input.clone();
        long.frame_duration_s = Some(90.0);
        assert_eq!(cal.sigma(&long, &restored, Some(&var)).unwrap_err(), UncertaintyError::NotShort(90.0));
    }

    #[test]
    fn descriptors_scale_sigma_per_frame() {
        // a noisy body on air: the same frame, σ with and without a
        // descriptor term; the factor on σ² is exp(c0 + c1·noise_px)
        let n = 32;
        let x: Vec<f32> = (0..n * n)
            .map(|i| {
                let (y, c) = ((i / n) as f32 - 15.5, (i % n) as f32 - 15.5);
                if y * y + c * c < 144.0 { 100.0 + if (i * 7919) % 13 < 6 { 20.0 } else { -17.0 } } else { 0.0 }
            })
            .collect();
        let input = Volume { nx: n, ny: n, nz: 3, spacing: [4.0; 3], data: x.repeat(3), frame_duration_s: Some(30.0) };
        let restored = Volume { data: input.data.iter().map(|v| if *v > 0.0 { 100.0 } else { 0.0 }).collect(), ..input.clone_shape() };
        let mut cal = test_calibration(0.5);
        let plain = cal.sigma(&input, &restored, None).unwrap();
        cal.descriptors = vec!["noise_px".into()];
        cal.descriptor_coef = vec![0.4, 0.5];
        let t = super::super::texture::describe(&input, &cal.descriptors, 0.05, body_mean(&input)).unwrap()[0] as f64;
        let want = ((0.4 + 0.5 * t) / 2.0).exp();
        let scaled = cal.sigma(&input, &restored, None).unwrap();
        let i = n * n + n * 16 + 16;
        assert!(plain.data[i] > 0.0);
        assert!(((scaled.data[i] / plain.data[i]) as f64 - want).abs() < 1e-4 * want, "{} vs {want}", scaled.data[i] / plain.data[i]);
        // an absurd coefficient is held: at most e^3 on σ²
        cal.descriptor_coef = vec![50.0, 0.0];
        let held = cal.sigma(&input, &restored, None).unwrap();
        assert!(((held.data[i] / plain.data[i]) as f64 - 1.5f64.exp()).abs() < 1e-3);
    }

    #[test]
    fn a_site_calibration_finds_the_factor_that_covers_68_percent() {
        // R flat, σ = 1 everywhere, PET90 − R drawn ±2·|N(0, 1)|-like by a
        // fixed sequence: the factor is the 68.3 % quantile of |PET90 − R|,
        // and after it R ± σ holds PET90 in 68.3 % of the voxels
        let n = 64;
        let restored = vol(vec![100.0; n * n], n, 30.0);
        let sigma = vol(vec![1.0; n * n], n, 30.0);
        let normal = |i: usize| {
            // the normal quantile of a uniform grid, by bisection on erf
            let u = (i as f64 + 0.5) / (n * n) as f64;
            let (mut lo, mut hi) = (-8.0f64, 8.0f64);
            for _ in 0..60 {
                let m = 0.5 * (lo + hi);
                if 0.5 * (1.0 + erf(m / 2f64.sqrt())) < u { lo = m } else { hi = m }
            }
            0.5 * (lo + hi)
        };
        let reference = vol((0..n * n).map(|i| 100.0 + 2.0 * normal((i * 2654435761) % (n * n)) as f32).collect(), n, 90.0);
        let cal = test_calibration(0.0);
        let mut site = SiteCalibration::new("m 1", &cal);
        site.add(&cal, &restored, &sigma, &reference, "pair 1");
        assert!(site.check("m 1", &cal).is_ok());
        // every voxel is in class 1 ("body"); the others take the pooled factor
        assert_eq!(site.voxels, vec![0, (n * n) as u64, 0, 0]);
        assert!((site.scale[1] - 2.0).abs() < 0.03, "{:?}", site.scale);
        assert_eq!(site.scale[0], site.scale[1]);
        assert!((site.coverage(1.0) - 68.27).abs() < 0.2, "{}", site.coverage(1.0));
        assert!((site.coverage(1.96) - 95.0).abs() < 0.5, "{}", site.coverage(1.96));
        // pairs accumulate: the same pair twice, the same factor, twice the voxels
        site.add(&cal, &restored, &sigma, &reference, "pair 2");
        assert_eq!(site.pairs.len(), 2);
        assert_eq!(site.voxels[1], 2 * (n * n) as u64);
        assert!((site.scale[1] - 2.0).abs() < 0.03);
        // σ with the site's factor: the model's σ times the class's factor
        let mut scaled = cal.clone();
        scaled.site_scale = site.scale.clone();
        let x = vol((0..n * n).map(|i| 100.0 + if i % 2 == 0 { 3.0 } else { -3.0 }).collect(), n, 30.0);
        let (a, b) = (cal.sigma(&x, &restored, None).unwrap(), scaled.sigma(&x, &restored, None).unwrap());
        assert!((b.data[100] / a.data[100] - site.scale[1] as f32).abs() < 1e-5);
        // it round-trips through its file, and a damaged one is refused
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("site.toml");
        site.save(&f).unwrap();
        assert_eq!(SiteCalibration::load(&f).unwrap(), site);
        let mut bad = site.clone();
        bad.scale.pop();
        assert!(bad.check("m 1", &cal).unwrap_err().contains("damaged (not 4 classes"));
        bad.scale = vec![1.0, -1.0, 1.0, 1.0];
        assert!(bad.check("m 1", &cal).unwrap_err().contains("scale must be"));
        // another model, or the same model recalibrated: a new file is needed
        assert!(site.check("m 2", &cal).unwrap_err().contains("fitted for model m 1"));
        let mut recalibrated = cal.clone();
        recalibrated.noise[2] = 1.5;
        assert!(site.check("m 1", &recalibrated).unwrap_err().contains("recalibrated"));
        // the site factor itself is not part of the fingerprint
        assert_eq!(scaled.fingerprint(), cal.fingerprint());
        // a failed write leaves nothing behind
        assert!(site.save(&d.path().join("no/such/dir/site.toml")).is_err());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    /// erf (Abramowitz and Stegun 7.1.26, |error| < 1.5e-7).
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs());
        let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * (-x * x).exp();
        if x >= 0.0 { y } else { -y }
    }

    #[test]
    fn summary_counts_body_voxels_only() {
        let n = 4;
        let mut r = vec![10.0f32; 16];
        r[0] = 0.0; // outside the body
        let mut s = vec![1.0f32; 16];
        s[0] = 100.0;
        s[1] = 5.0; // 50 % of R
        let sum = summarise(&vol(r.clone(), n, 30.0), &vol(s, n, 30.0), 0.25);
        assert!((sum.uncertain_share_pct - 100.0 / 15.0).abs() < 1e-6, "{sum:?}");
        assert!((sum.body_relative_sd_pct - 100.0 * (14.0 + 5.0) / 150.0).abs() < 1e-6, "{sum:?}");
    }
}
