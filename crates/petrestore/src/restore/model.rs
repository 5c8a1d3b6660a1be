//! Model packages: `models/<name>/model.onnx` + `model.toml`. The TOML says
//! what the network expects (input/output names, 2.5D context, batch,
//! normalisation), what it is for (frame durations, tracers) and where it
//! came from; its sha256 is checked against the ONNX file at load, so a
//! corrupt or swapped model is a startup error that names the file.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackage {
    id: String,
    version: String,
    #[serde(default = "default_purpose")]
    purpose: String,
    sha256: String,
    #[serde(default = "default_onnx")]
    onnx: String,
    io: Io,
    normalisation: Normalisation,
    selection: Selection,
    #[serde(default)]
    provenance: toml::Table,
    #[serde(default)]
    metrics: toml::Table,
    #[serde(default)]
    uncertainty: Option<super::uncertainty::Calibration>,
    #[serde(default, deserialize_with = "super::guard::one_or_many")]
    guard: Vec<super::guard::Guard>,
}

fn default_purpose() -> String {
    "clinical-evaluation".into()
}
fn default_onnx() -> String {
    "model.onnx".into()
}

/// Tensor names and layout.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Io {
    pub input: String,
    pub output: String,
    /// A second output: σ² of PET90 − output per pixel, in the input's
    /// normalised units squared (a σ head trained by likelihood; the
    /// `[uncertainty]` table's `head` weights use it).
    #[serde(default)]
    pub variance: Option<String>,
    /// Adjacent slices in (odd); the centre slice is restored.
    pub context_slices: usize,
    /// Slices per engine call.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Extra constant input channel after the slices. The one kind known:
    /// "frame_duration_over_90" (Actual Frame Duration / 90 s).
    #[serde(default)]
    pub condition: Option<String>,
    /// Constant input channels after the conditioning channel: descriptors
    /// of the series' own texture (`texture::KNOWN`), measured by the
    /// engines on the whole series, in this order.
    #[serde(default)]
    pub texture: Vec<String>,
    /// Height and width are padded (edge replicate) to a multiple of this
    /// and the output cropped back (a network with poolings needs it).
    #[serde(default = "default_pad")]
    pub pad_multiple: usize,
    /// Test-time augmentation: 1 (off), 2 (the network also runs on the
    /// slices flipped left-right), 3 (and up-down) or 4 (and both); the
    /// outputs, flipped back, are averaged. Costs that many inferences.
    #[serde(default = "default_tta")]
    pub tta: usize,
    /// The network's own pixel size (mm). When set, every slice is
    /// resampled to it, restored there, and the network's change mapped
    /// back onto the series' own grid (`neural::restore_volume`); absent,
    /// the network runs on the series' pixels as they are.
    #[serde(default)]
    pub working_pixel_mm: Option<f64>,
    /// The network's own slice spacing (mm): context slices are taken this
    /// far apart by interpolation between the series' slices. Needs
    /// `working_pixel_mm`; absent, the series' own neighbours are used.
    #[serde(default)]
    pub working_slice_mm: Option<f64>,
}

fn default_tta() -> usize {
    1
}

fn default_pad() -> usize {
    1
}

/// The conditioning channel kind this build knows.
pub const CONDITION_DURATION: &str = "frame_duration_over_90";

fn default_batch() -> usize {
    4
}

/// How pixel values are scaled for the network and back.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Normalisation {
    /// "body_mean": divide by the mean of voxels above
    /// `threshold_fraction` × the 99.9th percentile.
    pub kind: String,
    #[serde(default = "default_threshold")]
    pub threshold_fraction: f64,
}

fn default_threshold() -> f64 {
    0.05
}

/// What the model was trained for.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// [min, max] Actual Frame Duration in seconds.
    pub frame_durations_s: [f64; 2],
    pub tracers: Vec<String>,
    /// [min, max] in-plane pixel spacing (mm) the model was trained on;
    /// absent: any.
    #[serde(default)]
    pub pixel_mm: Option<[f64; 2]>,
}

/// A loaded, verified model package.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    pub dir: PathBuf,
    pub id: String,
    pub version: String,
    pub purpose: String,
    pub sha256: String,
    pub onnx_path: PathBuf,
    pub io: Io,
    pub normalisation: Normalisation,
    pub selection: Selection,
    pub provenance: toml::Table,
    pub metrics: toml::Table,
    /// How to give the restored image its σ (`[uncertainty]`, fitted on the
    /// validation grid); without it the model's output has no uncertainty series.
    pub uncertainty: Option<super::uncertainty::Calibration>,
    /// The lesion guard applied to every restored series: `[guard]` (one
    /// scale) or `[[guard]]` (several, applied in order); empty for none.
    pub guard: Vec<super::guard::Guard>,
}

/// A model package problem: which file, what is wrong, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model package {dir}: cannot read {file}: {reason}; set restore.model to a folder holding model.toml and model.onnx")]
    Read { dir: String, file: String, reason: String },
    #[error("model package {dir}: model.toml is invalid: {reason}")]
    Toml { dir: String, reason: String },
    #[error(
        "model {file}: sha256 is {actual}, model.toml says {expected}; the file is corrupt or not the one the package describes: reinstall the model package"
    )]
    Checksum { file: String, expected: String, actual: String },
    #[error("model package {dir}: {reason}")]
    Invalid { dir: String, reason: String },
}

impl ModelPackage {
    /// Read `dir/model.toml`, check the ONNX file's sha256.
    pub fn load(dir: &Path) -> Result<ModelPackage, ModelError> {
        let d = dir.display().to_string();
        let toml_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&toml_path).map_err(|e| ModelError::Read {
            dir: d.clone(),
            file: "model.toml".into(),
            reason: e.to_string(),
        })?;
        let raw: RawPackage = toml::from_str(&text).map_err(|e| ModelError::Toml { dir: d.clone(), reason: e.to_string() })?;
        if raw.io.context_slices == 0 || raw.io.context_slices.is_multiple_of(2) {
            return Err(ModelError::Invalid { dir: d, reason: format!("io.context_slices must be odd, is {}", raw.io.context_slices) });
        }
        if raw.io.batch == 0 || raw.io.batch > 256 {
            return Err(ModelError::Invalid { dir: d, reason: format!("io.batch must be 1..=256, is {}", raw.io.batch) });
        }
        if let Some(c) = raw.io.condition.as_deref().filter(|c| *c != CONDITION_DURATION) {
            return Err(ModelError::Invalid {
                dir: d,
                reason: format!("io.condition {c:?} is unknown (this build knows {CONDITION_DURATION:?})"),
            });
        }
        if let Some(t) = raw.io.texture.iter().find(|t| !super::texture::KNOWN.contains(&t.as_str())) {
            return Err(ModelError::Invalid {
                dir: d,
                reason: format!("io.texture {t:?} is unknown (this build knows {:?})", super::texture::KNOWN),
            });
        }
        if !raw.io.texture.is_empty() && raw.io.condition.is_none() {
            return Err(ModelError::Invalid { dir: d, reason: "io.texture follows the io.condition channel: give io.condition".into() });
        }
        if raw.io.pad_multiple == 0 || raw.io.pad_multiple > 64 {
            return Err(ModelError::Invalid { dir: d, reason: format!("io.pad_multiple must be 1..=64, is {}", raw.io.pad_multiple) });
        }
        if !(1..=4).contains(&raw.io.tta) {
            return Err(ModelError::Invalid {
                dir: d,
                reason: format!("io.tta must be 1 (off), 2 (also flipped left-right), 3 (and up-down) or 4 (and both), is {}", raw.io.tta),
            });
        }
        for (name, v) in [("io.working_pixel_mm", raw.io.working_pixel_mm), ("io.working_slice_mm", raw.io.working_slice_mm)] {
            if let Some(mm) = v.filter(|mm| !(0.5..=20.0).contains(mm)) {
                return Err(ModelError::Invalid { dir: d, reason: format!("{name} must be 0.5..=20 mm, is {mm}") });
            }
        }
        if raw.io.working_slice_mm.is_some() && raw.io.working_pixel_mm.is_none() {
            return Err(ModelError::Invalid { dir: d, reason: "io.working_slice_mm needs io.working_pixel_mm".into() });
        }
        if raw.normalisation.kind != "body_mean" {
            return Err(ModelError::Invalid {
                dir: d,
                reason: format!("normalisation.kind {:?} is unknown (this build knows \"body_mean\")", raw.normalisation.kind),
            });
        }
        if let Some(u) = &raw.uncertainty {
            u.check().map_err(|e| ModelError::Invalid { dir: d.clone(), reason: e.to_string() })?;
            if u.uses_variance() && raw.io.variance.is_none() {
                return Err(ModelError::Invalid {
                    dir: d,
                    reason: "uncertainty.head weighs the network's variance output: name it in io.variance".into(),
                });
            }
        }
        for g in &raw.guard {
            g.check().map_err(|reason| ModelError::Invalid { dir: d.clone(), reason })?;
        }
        let onnx_path = dir.join(&raw.onnx);
        let bytes =
            std::fs::read(&onnx_path).map_err(|e| ModelError::Read { dir: d.clone(), file: raw.onnx.clone(), reason: e.to_string() })?;
        let actual: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        if !actual.eq_ignore_ascii_case(raw.sha256.trim()) {
            return Err(ModelError::Checksum { file: onnx_path.display().to_string(), expected: raw.sha256, actual });
        }
        Ok(ModelPackage {
            dir: dir.to_owned(),
            id: raw.id,
            version: raw.version,
            purpose: raw.purpose,
            sha256: actual,
            onnx_path,
            io: raw.io,
            normalisation: raw.normalisation,
            selection: raw.selection,
            provenance: raw.provenance,
            metrics: raw.metrics,
            uncertainty: raw.uncertainty,
            guard: raw.guard,
        })
    }

    /// Identity used to salt derived UIDs and in Derivation Description:
    /// id, version and the first 12 hex digits of the sha256; then every
    /// setting that changes the pixels as the weights do: test-time
    /// augmentation when on, and each scale of a lesion guard, in order.
    pub fn model_id(&self) -> String {
        let mut id = format!("{}@{}+{}", self.id, self.version, &self.sha256[..12]);
        if self.io.tta > 1 {
            id += &format!("+tta{}", self.io.tta);
        }
        for g in &self.guard {
            id += &format!("+guard{}x{}", g.fwhm_mm, g.z);
            if g.power != 1.0 {
                id += &format!("p{}", g.power);
            }
        }
        id
    }

    pub fn is_test_model(&self) -> bool {
        self.purpose == "test"
    }

    /// Input channels per slice: the context slices, a conditioning
    /// channel, and one channel per texture descriptor.
    pub fn input_channels(&self) -> usize {
        self.io.context_slices + usize::from(self.io.condition.is_some()) + self.io.texture.len()
    }

    /// The warning that travels with every series this package restores.
    pub fn notice(&self) -> Option<String> {
        match self.purpose.as_str() {
            "test" => Some(super::TEST_MODEL_NOTICE.to_string()),
            "research" => Some(super::RESEARCH_MODEL_NOTICE.to_string()),
            _ => None,
        }
    }
}

/// The ONNX graph in `path` cut to what `output` needs: the nodes that do
/// not lead to it, their initialisers and every other graph output removed.
/// Refused for graphs with subgraphs (If, Loop), whose outer references a
/// cut could break.
pub fn graph_cut_to(path: &Path, output: &str) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    graph_cut(&bytes, output).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`graph_cut_to`] on a graph already read.
pub fn graph_cut(bytes: &[u8], output: &str) -> Result<Vec<u8>, String> {
    use prost::Message;
    let mut model = tract_onnx::pb::ModelProto::decode(bytes).map_err(|e| e.to_string())?;
    let graph = model.graph.as_mut().ok_or("no graph")?;
    if !graph.output.iter().any(|o| o.name == output) {
        return Err(format!("no output {output:?}"));
    }
    graph.output.retain(|o| o.name == output);
    prune(graph)?;
    Ok(model.encode_to_vec())
}

/// Remove the nodes, initialisers and value infos no graph output needs.
fn prune(graph: &mut tract_onnx::pb::GraphProto) -> Result<(), String> {
    use std::collections::HashSet;
    let mut needed: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut keep = vec![false; graph.node.len()];
    for (i, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o)) {
            if node.attribute.iter().any(|a| a.g.is_some() || !a.graphs.is_empty()) {
                return Err(format!("node {:?} has a subgraph", node.name));
            }
            keep[i] = true;
            needed.extend(node.input.iter().filter(|n| !n.is_empty()).cloned());
        }
    }
    let mut k = keep.into_iter();
    graph.node.retain(|_| k.next().unwrap_or(false));
    graph.initializer.retain(|t| needed.contains(&t.name));
    graph.value_info.retain(|v| needed.contains(&v.name));
    Ok(())
}

/// The tensor a textured package's graph (petrain.export) computes the
/// series' texture descriptors into, `[batch, T, 1, 1]`: the mean of the
/// input's constant texture channels.
pub const TEXTURE_TENSOR: &str = "texture";

/// The ONNX graph `bytes` for one series whose texture descriptors are
/// `texture`: every learned texture bias (a 1×1 convolution of the
/// [`TEXTURE_TENSOR`] added to a convolution's output, petrain.export)
/// computed once and folded into that convolution's own bias, the bias
/// convolutions and additions removed, and the nodes that measured the
/// texture from the input with them. The graph still takes the same input
/// (its texture channels are then unread) and computes the same function
/// for inputs whose texture channels hold `texture`, up to float rounding.
///
/// Why: ONNX Runtime's CPU provider fuses each 3×3 convolution with the
/// ReLU after it, but not across an addition between them; folded, each
/// pass costs what an unconditioned network of the same size does
/// (BENCHMARKS.md). Refused (and the engine keeps the graph as it is) for a
/// graph where the texture feeds anything but such biases.
pub fn graph_with_texture(bytes: &[u8], texture: &[f32]) -> Result<Vec<u8>, String> {
    use prost::Message;
    use std::collections::{HashMap, HashSet};
    use tract_onnx::pb::TensorProto;
    let mut model = tract_onnx::pb::ModelProto::decode(bytes).map_err(|e| e.to_string())?;
    let graph = model.graph.as_mut().ok_or("no graph")?;
    let producer: HashMap<String, usize> =
        graph.node.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i))).collect();
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in &graph.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    if !producer.contains_key(TEXTURE_TENSOR) {
        return Err(format!("the graph computes no {TEXTURE_TENSOR:?} tensor"));
    }
    let inits: HashMap<String, usize> = graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let floats = |name: &str| -> Result<(Vec<i64>, Vec<f32>), String> {
        let t = &graph.initializer[*inits.get(name).ok_or_else(|| format!("{name:?} is not an initialiser"))?];
        if t.data_type != 1 {
            return Err(format!("{name:?} is not float32"));
        }
        let v = if !t.raw_data.is_empty() {
            t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        } else {
            t.float_data.clone()
        };
        if v.len() as i64 != t.dims.iter().product::<i64>() {
            return Err(format!("{name:?} holds {} values for dims {:?}", v.len(), t.dims));
        }
        Ok((t.dims.clone(), v))
    };
    // (addition, texture convolution, image convolution, folded bias)
    let mut folds: Vec<(usize, usize, usize, Vec<f32>)> = Vec::new();
    for (a, add) in graph.node.iter().enumerate() {
        if add.op_type != "Add" || add.input.len() != 2 {
            continue;
        }
        let node = |name: &String| producer.get(name).map(|&i| (i, &graph.node[i]));
        let (Some((x, xn)), Some((y, yn))) = (node(&add.input[0]), node(&add.input[1])) else { continue };
        let ((t, tn), (c, cn)) = match (xn.input.first(), yn.input.first()) {
            (_, Some(i)) if i == TEXTURE_TENSOR => ((y, yn), (x, xn)),
            (Some(i), _) if i == TEXTURE_TENSOR => ((x, xn), (y, yn)),
            _ => continue,
        };
        let plain = |n: &tract_onnx::pb::NodeProto| n.op_type == "Conv" && n.output.len() == 1 && readers.get(&n.output[0]) == Some(&1);
        if !plain(tn) || !plain(cn) || tn.input.len() < 2 || cn.input.len() < 2 {
            return Err(format!("the texture reaches {:?} by a path other than a bias convolution", add.name));
        }
        // folded, the two convolutions' own outputs are no longer computed
        if let Some(o) = [tn, cn].iter().map(|n| &n.output[0]).find(|o| graph.output.iter().any(|g| &g.name == *o)) {
            return Err(format!("{o:?} is a graph output and a texture bias's operand: folding would leave it uncomputed"));
        }
        let (wd, w) = floats(&tn.input[1])?;
        if wd.len() != 4 || wd[1] as usize != texture.len() || wd[2] != 1 || wd[3] != 1 {
            return Err(format!("{:?} is not a 1x1 convolution of {} descriptors (dims {wd:?})", tn.name, texture.len()));
        }
        let co = wd[0] as usize;
        let tb = match tn.input.get(2).filter(|s| !s.is_empty()) {
            Some(b) => floats(b)?.1,
            None => vec![0.0; co],
        };
        let cb = match cn.input.get(2).filter(|s| !s.is_empty()) {
            Some(b) => floats(b)?.1,
            None => vec![0.0; co],
        };
        let (_, cw) = floats(&cn.input[1])?;
        if tb.len() != co || cb.len() != co || cw.is_empty() || cw.len() % co != 0 {
            return Err(format!("{:?} and {:?} disagree on their output channels", tn.name, cn.name));
        }
        let bias = (0..co)
            .map(|o| {
                let t: f64 = texture.iter().enumerate().map(|(j, v)| w[o * texture.len() + j] as f64 * *v as f64).sum();
                (cb[o] as f64 + tb[o] as f64 + t) as f32
            })
            .collect();
        folds.push((a, t, c, bias));
    }
    if folds.is_empty() {
        return Err(format!("no texture bias to fold: {TEXTURE_TENSOR:?} is not added to a convolution"));
    }
    let mut drop: HashSet<usize> = HashSet::new();
    for (a, t, c, bias) in folds {
        let out = graph.node[a].output[0].clone();
        let name = format!("{out}_bias_with_texture");
        graph.initializer.push(TensorProto {
            dims: vec![bias.len() as i64],
            data_type: 1,
            raw_data: bias.iter().flat_map(|b| b.to_le_bytes()).collect(),
            name: name.clone(),
            ..Default::default()
        });
        let conv = &mut graph.node[c];
        conv.input.truncate(2);
        conv.input.push(name);
        conv.output[0] = out;
        drop.extend([a, t]);
    }
    let mut i = 0;
    graph.node.retain(|_| {
        i += 1;
        !drop.contains(&(i - 1))
    });
    prune(graph)?;
    if let Some(n) = graph.node.iter().find(|n| n.input.iter().any(|i| i == TEXTURE_TENSOR)) {
        return Err(format!("{TEXTURE_TENSOR:?} still feeds {:?} ({}), which cannot be folded", n.name, n.op_type));
    }
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_test_model(to: &Path) {
        let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/test-unet");
        std::fs::create_dir_all(to).unwrap();
        for f in ["model.toml", "model.onnx"] {
            std::fs::copy(src.join(f), to.join(f)).unwrap();
        }
    }

    #[test]
    fn shipped_test_model_loads() {
        let p = ModelPackage::load(&Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/test-unet")).unwrap();
        assert_eq!(p.io.context_slices, 5);
        assert!(p.is_test_model());
        assert!(p.model_id().starts_with("petrestore-test-unet@0.1.0+"));
    }

    #[test]
    fn corrupt_model_is_named_with_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        copy_test_model(d.path());
        let onnx = d.path().join("model.onnx");
        let mut b = std::fs::read(&onnx).unwrap();
        let n = b.len();
        b[n / 2] ^= 0xff;
        std::fs::write(&onnx, b).unwrap();
        let e = ModelPackage::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("model.onnx") && e.contains("sha256") && e.contains("reinstall"), "{e}");
    }

    /// A copy of the test model in `dir`, loaded with `extra` lines added to its `[io]` table.
    fn with_io(dir: &Path) -> impl Fn(&str) -> Result<ModelPackage, ModelError> + '_ {
        copy_test_model(dir);
        let toml = dir.join("model.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        move |extra: &str| {
            std::fs::write(&toml, text.replacen("[io]\n", &format!("[io]\n{extra}\n"), 1)).unwrap();
            ModelPackage::load(dir)
        }
    }

    #[test]
    fn working_grid_settings_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let with = with_io(d.path());
        let p = with("working_pixel_mm = 4.6875\nworking_slice_mm = 3.27").unwrap();
        assert_eq!((p.io.working_pixel_mm, p.io.working_slice_mm), (Some(4.6875), Some(3.27)));
        let e = with("working_slice_mm = 3.27").unwrap_err().to_string();
        assert!(e.contains("needs io.working_pixel_mm"), "{e}");
        let e = with("working_pixel_mm = 0").unwrap_err().to_string();
        assert!(e.contains("io.working_pixel_mm must be 0.5..=20 mm"), "{e}");
    }

    #[test]
    fn test_time_augmentation_is_checked_and_salts_the_identity() {
        let d = tempfile::tempdir().unwrap();
        let with = with_io(d.path());
        let off = with("tta = 1").unwrap().model_id();
        assert!(!off.contains("+tta"), "{off}");
        let two = with("tta = 2").unwrap().model_id();
        let four = with("tta = 4").unwrap().model_id();
        // the flips change the pixels: two settings of one network are two identities
        assert_eq!((two.strip_suffix("+tta2"), four.strip_suffix("+tta4")), (Some(off.as_str()), Some(off.as_str())));
        assert!(with("tta = 3").unwrap().model_id().ends_with("+tta3"));
        let e = with("tta = 5").unwrap_err().to_string();
        assert!(e.contains("io.tta must be 1 (off), 2 (also flipped left-right), 3 (and up-down) or 4") && e.contains("is 5"), "{e}");
        assert!(with("tta = 0").is_err());
    }

    #[test]
    fn texture_channels_are_checked_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let with = with_io(d.path());
        let p = with("condition = \"frame_duration_over_90\"\ntexture = [\"noise_px\", \"axial_corr\"]").unwrap();
        assert_eq!(p.input_channels(), 5 + 1 + 2);
        let e = with("condition = \"frame_duration_over_90\"\ntexture = [\"snr\"]").unwrap_err().to_string();
        assert!(e.contains("io.texture \"snr\" is unknown") && e.contains("noise_2px"), "{e}");
        let e = with("texture = [\"noise_px\"]").unwrap_err().to_string();
        assert!(e.contains("give io.condition"), "{e}");
    }

    #[test]
    fn a_guard_is_read_and_checked() {
        let d = tempfile::tempdir().unwrap();
        copy_test_model(d.path());
        let toml = d.path().join("model.toml");
        let base = std::fs::read_to_string(&toml).unwrap();
        let with = |table: &str| {
            std::fs::write(&toml, format!("{base}\n[guard]\n{table}\n")).unwrap();
            ModelPackage::load(d.path())
        };
        let p = with("fwhm_mm = 5\nz = 1.25").unwrap();
        assert_eq!(p.guard, vec![super::super::guard::Guard { fwhm_mm: 5.0, z: 1.25, power: 1.0 }]);
        // the guard changes the pixels: its settings salt the derived UIDs
        assert!(p.model_id().starts_with("petrestore-test-unet@0.1.0+") && p.model_id().ends_with("+guard5x1.25"), "{}", p.model_id());
        assert_ne!(p.model_id(), with("fwhm_mm = 5\nz = 1.5").unwrap().model_id());
        let e = with("fwhm_mm = 0.2\nz = 1.25").unwrap_err().to_string();
        assert!(e.contains("guard.fwhm_mm must be 1..=30 mm"), "{e}");
        let e = with("fwhm_mm = 5").unwrap_err().to_string();
        assert!(e.contains("missing field `z`"), "{e}");
        // the noise model's power is part of the identity when it is not 1
        let p = with("fwhm_mm = 5\nz = 1.25\npower = 0.75").unwrap();
        assert!(p.model_id().ends_with("+guard5x1.25p0.75"), "{}", p.model_id());
        let e = with("fwhm_mm = 5\nz = 1.25\npower = 2").unwrap_err().to_string();
        assert!(e.contains("guard.power must be 0..=1"), "{e}");
        // several scales, applied in order, each part of the identity
        std::fs::write(&toml, format!("{base}\n[[guard]]\nfwhm_mm = 5\nz = 1.25\n[[guard]]\nfwhm_mm = 12\nz = 2\n")).unwrap();
        let p = ModelPackage::load(d.path()).unwrap();
        assert_eq!(p.guard.iter().map(|g| (g.fwhm_mm, g.z)).collect::<Vec<_>>(), [(5.0, 1.25), (12.0, 2.0)]);
        assert!(p.model_id().ends_with("+guard5x1.25+guard12x2"), "{}", p.model_id());
        std::fs::write(&toml, format!("{base}\n[[guard]]\nfwhm_mm = 5\nz = 1.25\n[[guard]]\nfwhm_mm = 40\nz = 2\n")).unwrap();
        let e = ModelPackage::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("guard.fwhm_mm must be 1..=30 mm, is 40"), "{e}");
        std::fs::write(&toml, format!("{base}\n[[guard]]\nfwhm_mm = 5\n")).unwrap();
        let e = ModelPackage::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("missing field `z`"), "{e}");
        std::fs::write(&toml, &base).unwrap();
        assert!(ModelPackage::load(d.path()).unwrap().guard.is_empty());
    }

    #[test]
    fn a_head_calibration_needs_the_variance_output_named() {
        let d = tempfile::tempdir().unwrap();
        copy_test_model(d.path());
        let table = "\n[uncertainty]\nwindow_mm = 10\ntexture_mm = 6\nclass_edges = [0.5, 1.5, 3]\n\
                     noise = [0, 0, 0, 0]\ntexture = [0, 0, 0, 0]\nhead = [1, 1, 1, 1]\n";
        let toml = d.path().join("model.toml");
        let base = std::fs::read_to_string(&toml).unwrap();
        std::fs::write(&toml, format!("{base}{table}")).unwrap();
        let e = ModelPackage::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("uncertainty.head") && e.contains("io.variance"), "{e}");
        std::fs::write(&toml, format!("{}{table}", base.replacen("[io]\n", "[io]\nvariance = \"variance\"\n", 1))).unwrap();
        let p = ModelPackage::load(d.path()).unwrap();
        assert_eq!(p.io.variance.as_deref(), Some("variance"));
        assert!(p.uncertainty.as_ref().is_some_and(|u| u.uses_variance()));
    }

    #[test]
    fn missing_package_says_what_to_set() {
        let e = ModelPackage::load(Path::new("/nonexistent/model")).unwrap_err().to_string();
        assert!(e.contains("model.toml") && e.contains("restore.model"), "{e}");
    }
}

#[cfg(test)]
mod graph_cut_tests {
    use super::*;
    use tract_onnx::prelude::*;

    /// The shipped package: a restoration output and a σ head's variance.
    fn shipped() -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/petrestore-unet25d/model.onnx")
    }

    fn run(model: InferenceModel, x: &Tensor) -> TVec<TValue> {
        let s = x.shape().to_vec();
        model
            .with_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), tvec![s[0], s[1], s[2], s[3]]))
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec!(x.clone().into()))
            .unwrap()
    }

    #[test]
    fn the_graph_cut_to_the_output_computes_it_without_the_head() {
        use prost::Message;
        let full_bytes = std::fs::read(shipped()).unwrap();
        let full = tract_onnx::pb::ModelProto::decode(&full_bytes[..]).unwrap().graph.unwrap();
        assert_eq!(full.output.len(), 2, "the shipped graph has R and the variance");
        let cut_bytes = graph_cut_to(&shipped(), "output").unwrap();
        let cut = tract_onnx::pb::ModelProto::decode(&cut_bytes[..]).unwrap().graph.unwrap();
        assert_eq!(cut.output.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["output"]);
        assert!(cut.node.len() < full.node.len() && cut.initializer.len() < full.initializer.len());
        assert!(!cut.node.iter().any(|n| n.output.iter().any(|o| o == "variance")));
        // every input a kept node reads is made by a kept node, an initialiser or the graph input
        let made: std::collections::HashSet<&str> = cut
            .node
            .iter()
            .flat_map(|n| n.output.iter())
            .chain(cut.initializer.iter().map(|t| &t.name))
            .chain(cut.input.iter().map(|i| &i.name))
            .map(String::as_str)
            .collect();
        for n in &cut.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                assert!(made.contains(i.as_str()), "node {:?} reads {i:?}, which the cut graph does not make", n.name);
            }
        }
        // the same R, bit for bit, from the cut graph
        let (c, h, w) = (9, 32, 32);
        let data: Vec<f32> = (0..c * h * w).map(|k| 0.5 + ((k * 7919) % 101) as f32 / 101.0).collect();
        let x = Tensor::from_shape(&[1, c, h, w], &data).unwrap();
        let a = run(tract_onnx::onnx().model_for_read(&mut &full_bytes[..]).unwrap(), &x);
        let b = run(tract_onnx::onnx().model_for_read(&mut &cut_bytes[..]).unwrap(), &x);
        assert_eq!(b.len(), 1);
        assert_eq!(a[0].to_plain_array_view::<f32>().unwrap(), b[0].to_plain_array_view::<f32>().unwrap());
        // an output the graph does not have is refused
        let err = graph_cut_to(&shipped(), "restored").unwrap_err();
        assert!(err.contains("no output \"restored\""), "{err}");
    }

    #[test]
    fn the_texture_folded_into_the_biases_computes_the_same_function() {
        use prost::Message;
        let full_bytes = std::fs::read(shipped()).unwrap();
        let texture = [-3.1f32, -2.6, 0.55];
        let folded_bytes = graph_with_texture(&full_bytes, &texture).unwrap();
        let full = tract_onnx::pb::ModelProto::decode(&full_bytes[..]).unwrap().graph.unwrap();
        let folded = tract_onnx::pb::ModelProto::decode(&folded_bytes[..]).unwrap().graph.unwrap();
        let count = |g: &tract_onnx::pb::GraphProto, op: &str| g.node.iter().filter(|n| n.op_type == op).count();
        // ten bias convolutions (five blocks of the network, five of the σ head) and their additions gone
        assert_eq!(count(&full, "Conv") - count(&folded, "Conv"), 10);
        assert_eq!(count(&full, "Add") - count(&folded, "Add"), 10);
        assert!(!folded.node.iter().any(|n| n.input.iter().any(|i| i == TEXTURE_TENSOR) || n.output.iter().any(|o| o == TEXTURE_TENSOR)));
        assert_eq!(folded.output.len(), 2, "R and the variance are both still computed");
        // the same R and variance for an input whose texture channels hold those values
        let (c, h, w) = (9, 32, 32);
        let data: Vec<f32> = (0..c * h * w)
            .map(|k| if k / (h * w) >= 6 { texture[k / (h * w) - 6] } else { 0.5 + ((k * 7919) % 101) as f32 / 101.0 })
            .collect();
        let x = Tensor::from_shape(&[1, c, h, w], &data).unwrap();
        let a = run(tract_onnx::onnx().model_for_read(&mut &full_bytes[..]).unwrap(), &x);
        let b = run(tract_onnx::onnx().model_for_read(&mut &folded_bytes[..]).unwrap(), &x);
        for (k, what) in ["R", "variance"].iter().enumerate() {
            let (a, b) = (a[k].to_plain_array_view::<f32>().unwrap(), b[k].to_plain_array_view::<f32>().unwrap());
            let span = a.iter().copied().fold(f32::MIN, f32::max) - a.iter().copied().fold(f32::MAX, f32::min);
            let worst = a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            assert!(span > 0.0 && worst <= 1e-5 * span.max(1.0), "{what}: folded differs by {worst} (range {span})");
        }
        // other descriptors give another function: the fold used the values given
        let other = graph_with_texture(&full_bytes, &[0.0, 0.0, 0.0]).unwrap();
        let o = run(tract_onnx::onnx().model_for_read(&mut &other[..]).unwrap(), &x);
        assert_ne!(o[0].to_plain_array_view::<f32>().unwrap(), a[0].to_plain_array_view::<f32>().unwrap());
        // a graph without a texture input, or descriptors of the wrong count, are refused
        let test_model =
            std::fs::read(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join("models/test-unet/model.onnx")).unwrap();
        let err = graph_with_texture(&test_model, &texture).unwrap_err();
        assert!(err.contains("computes no \"texture\""), "{err}");
        let err = graph_with_texture(&full_bytes, &texture[..2]).unwrap_err();
        assert!(err.contains("not a 1x1 convolution of 2 descriptors"), "{err}");
        // a convolution whose output is also a graph output cannot lose that output to the fold
        let mut model = tract_onnx::pb::ModelProto::decode(&full_bytes[..]).unwrap();
        let g = model.graph.as_mut().unwrap();
        let texture_convs: Vec<String> =
            g.node.iter().filter(|n| n.op_type == "Conv" && n.input[0] == TEXTURE_TENSOR).map(|n| n.output[0].clone()).collect();
        let add = g.node.iter().find(|n| n.op_type == "Add" && n.input.iter().any(|i| texture_convs.contains(i))).expect("a texture bias");
        let image_conv = add.input.iter().find(|i| !texture_convs.contains(i)).unwrap().clone();
        assert!(g.node.iter().any(|n| n.op_type == "Conv" && n.output[0] == image_conv), "{image_conv} is a convolution's output");
        g.output.push(tract_onnx::pb::ValueInfoProto { name: image_conv.clone(), ..Default::default() });
        let err = graph_with_texture(&model.encode_to_vec(), &texture).unwrap_err();
        assert!(err.contains(&format!("{image_conv:?} is a graph output")), "{err}");
    }
}
