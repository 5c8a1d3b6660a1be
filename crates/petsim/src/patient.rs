//! Random anthropomorphic torso phantoms in families, for training and
//! held-out evaluation.
//!
//! A [`Patient`] is a z-consistent 3D object: body outline with
//! subcutaneous fat over muscle, cold lungs, heart (myocardium around the
//! blood pool), liver, spleen, kidneys, vertebral marrow, and hot lesions
//! (4–30 mm, 2:1–10:1 against the organ they sit in). Everything is drawn
//! from a seeded generator, so `(family, seed)` names one patient for good.
//!
//! Families differ in how shapes are drawn, so a model can be tested on
//! anatomy it never saw:
//! - [`Family::Ellipse`]: axis-aligned ellipses and ellipsoids (training and
//!   validation);
//! - [`Family::Lobulated`]: outlines with 2nd–4th order harmonic bumps and
//!   rotated organs (held-out test family, never trained on);
//! - [`Family::Textured`]: rotated superellipse outlines (from diamond-like
//!   to box-like) and organs whose uptake varies smoothly inside them by
//!   5–15 %, as real organs' does (a validation family that is neither the
//!   training's nor the test's, so that choices made on it are not choices
//!   made on the training anatomy).

use rand::{Rng, SeedableRng};

/// How shapes are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ellipse,
    Lobulated,
    Textured,
}

impl Family {
    pub fn parse(s: &str) -> Option<Family> {
        match s {
            "ellipse" => Some(Family::Ellipse),
            "lobulated" => Some(Family::Lobulated),
            "textured" => Some(Family::Textured),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Family::Ellipse => "ellipse",
            Family::Lobulated => "lobulated",
            Family::Textured => "textured",
        }
    }
}

/// A closed outline in (x, y) extruded over [z0, z1] with rounded ends.
#[derive(Debug, Clone)]
pub struct Shape {
    pub cx: f64,
    pub cy: f64,
    pub rx: f64,
    pub ry: f64,
    /// Rotation (radians) of the outline.
    pub angle: f64,
    /// (order, amplitude, phase) of radial harmonics.
    pub harmonics: Vec<(f64, f64, f64)>,
    /// Exponent of the superellipse |u|^p + |v|^p ≤ 1 (2: an ellipse).
    pub power: f64,
    pub z0: f64,
    pub z1: f64,
    /// Length (mm) over which the section shrinks to nothing at either end.
    pub taper: f64,
}

impl Shape {
    pub fn inside(&self, x: f64, y: f64, z: f64) -> bool {
        if z < self.z0 || z > self.z1 {
            return false;
        }
        let edge = (z - self.z0).min(self.z1 - z);
        let scale = if self.taper > 0.0 && edge < self.taper {
            let t = edge / self.taper;
            (1.0 - (1.0 - t) * (1.0 - t)).sqrt()
        } else {
            1.0
        };
        let (dx, dy) = (x - self.cx, y - self.cy);
        let (c, s) = (self.angle.cos(), self.angle.sin());
        let (u, v) = ((dx * c + dy * s) / (self.rx * scale), (-dx * s + dy * c) / (self.ry * scale));
        if self.power != 2.0 {
            return u.abs().powf(self.power) + v.abs().powf(self.power) <= 1.0;
        }
        let r2 = u * u + v * v;
        if self.harmonics.is_empty() {
            return r2 <= 1.0;
        }
        let th = v.atan2(u);
        let r = 1.0 + self.harmonics.iter().map(|(k, a, p)| a * (k * th + p).cos()).sum::<f64>();
        r2 <= r * r
    }
}

/// One painted region (later regions overwrite earlier ones).
#[derive(Debug, Clone)]
pub struct Region {
    pub name: &'static str,
    pub shape: Shape,
    /// Bq/ml.
    pub activity: f64,
    /// 1/mm at 511 keV.
    pub mu: f64,
    /// Smooth variation of the uptake inside the region (empty: uniform).
    pub texture: Texture,
}

/// A smooth multiplicative variation of uptake: 1 + Σ a·cos(k·r + φ) over a
/// few plane waves (k in rad/mm), so an organ is not one flat value.
#[derive(Debug, Clone, Default)]
pub struct Texture(pub Vec<([f64; 3], f64, f64)>);

impl Texture {
    /// Waves of 25–80 mm wavelength whose amplitudes add up to 5–15 %.
    fn draw(u: &mut impl FnMut(f64, f64) -> f64) -> Texture {
        let total = u(0.05, 0.15);
        let waves = 3;
        Texture(
            (0..waves)
                .map(|_| {
                    let k = std::f64::consts::TAU / u(25.0, 80.0);
                    let (th, ph) = (u(0.0, std::f64::consts::PI), u(0.0, std::f64::consts::TAU));
                    ([k * th.sin() * ph.cos(), k * th.sin() * ph.sin(), k * th.cos()], total / waves as f64, u(0.0, std::f64::consts::TAU))
                })
                .collect(),
        )
    }
    fn factor(&self, x: f64, y: f64, z: f64) -> f64 {
        1.0 + self.0.iter().map(|(k, a, p)| a * (k[0] * x + k[1] * y + k[2] * z + p).cos()).sum::<f64>()
    }
}

/// A hot sphere.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lesion {
    pub x_mm: f64,
    pub y_mm: f64,
    /// Patient z (mm) of the centre.
    pub z_mm: f64,
    pub diameter_mm: f64,
    pub activity_bqml: f64,
    /// Activity of the organ around it.
    pub background_bqml: f64,
    pub host: &'static str,
}

/// One simulated patient.
#[derive(Debug, Clone)]
pub struct Patient {
    pub family: Family,
    pub seed: u64,
    pub body: Shape,
    pub muscle: Shape,
    pub fat_bqml: f64,
    pub muscle_bqml: f64,
    /// Variation of the muscle's and fat's uptake.
    pub soft_texture: Texture,
    pub regions: Vec<Region>,
    pub lesions: Vec<Lesion>,
    /// Prompts per slice through the liver in 90 s (dose and size vary).
    pub counts_90s: f64,
}

const WATER: f64 = 0.0096;

impl Patient {
    /// Draw a patient. Lesions are placed with centres in [lesion_z0, lesion_z1].
    pub fn generate(family: Family, seed: u64, lesion_z0: f64, lesion_z1: f64) -> Patient {
        let salt = match family {
            Family::Ellipse => 0x5eed_0001u64,
            Family::Lobulated => 0x5eed_0002u64,
            Family::Textured => 0x5eed_0003u64,
        };
        let rng = std::cell::RefCell::new(rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt));
        let u = |a: f64, b: f64| rng.borrow_mut().random_range(a..b);
        // The ellipse and lobulated families draw exactly what they always
        // drew, in the same order, so their patients stay the same.
        let shape = |cx: f64, cy: f64, rx: f64, ry: f64, z0: f64, z1: f64, taper: f64| -> Shape {
            let (angle, harmonics, power) = match family {
                Family::Lobulated => {
                    let h = (2..=4).map(|k| (k as f64, u(0.0, 0.07), u(0.0, std::f64::consts::TAU))).collect();
                    (u(-0.35, 0.35), h, 2.0)
                }
                Family::Textured => (u(-0.5, 0.5), Vec::new(), u(1.6, 3.2)),
                Family::Ellipse => (0.0, Vec::new(), 2.0),
            };
            Shape { cx, cy, rx, ry, angle, harmonics, power, z0, z1, taper }
        };
        let (bx, by) = (u(140.0, 190.0), u(95.0, 125.0));
        let sx = bx / 170.0;
        let sy = by / 110.0;
        let fat = u(6.0, 20.0);
        let uptake = u(0.7, 1.4);
        let (zt, zb) = (-400.0, 800.0);
        let body = Shape { angle: 0.0, ..shape(0.0, 0.0, bx, by, zt, zb, 0.0) };
        let muscle = Shape { rx: bx - fat, ry: by - fat, ..body.clone() };
        let j = |v: f64| v + u(-8.0, 8.0);
        let mut regions = Vec::new();
        let lung_top = u(-20.0, 10.0);
        let lung_bottom = u(110.0, 150.0);
        for side in [-1.0, 1.0] {
            let (cx, cy) = (j(side * 70.0 * sx), j(-10.0 * sy));
            let s = shape(cx, cy, u(45.0, 60.0) * sx, u(55.0, 70.0) * sy, lung_top, lung_bottom, 40.0);
            regions.push(Region {
                name: "lung",
                shape: s,
                activity: u(350.0, 900.0) * uptake,
                mu: u(0.0022, 0.0032),
                texture: Texture::default(),
            });
        }
        let heart_z = u(40.0, 70.0);
        let (hx, hy) = (j(-5.0), j(-40.0 * sy));
        let hr = u(30.0, 40.0);
        let myo = u(2_500.0, 14_000.0) * uptake;
        let s = shape(hx, hy, hr, hr * u(0.85, 1.15), heart_z - 45.0, heart_z + 45.0, 35.0);
        regions.push(Region { name: "myocardium", shape: s.clone(), activity: myo, mu: WATER, texture: Texture::default() });
        let pool = Shape { rx: s.rx * 0.62, ry: s.ry * 0.62, z0: s.z0 + 12.0, z1: s.z1 - 12.0, taper: 25.0, ..s };
        regions.push(Region { name: "blood", shape: pool, activity: u(1_300.0, 2_500.0) * uptake, mu: WATER, texture: Texture::default() });
        let liver_top = u(70.0, 110.0);
        let s = shape(j(-60.0 * sx), j(20.0 * sy), u(60.0, 80.0) * sx, u(45.0, 62.0) * sy, liver_top, liver_top + u(130.0, 180.0), 30.0);
        let liver = u(5_000.0, 10_000.0) * uptake;
        regions.push(Region { name: "liver", shape: s, activity: liver, mu: WATER, texture: Texture::default() });
        let sz = u(90.0, 130.0);
        let s = shape(j(100.0 * sx), j(25.0 * sy), u(20.0, 30.0), u(28.0, 40.0), sz, sz + u(70.0, 100.0), 20.0);
        regions.push(Region { name: "spleen", shape: s, activity: u(3_500.0, 7_000.0) * uptake, mu: WATER, texture: Texture::default() });
        let kz = u(170.0, 210.0);
        let kidney = u(4_000.0, 12_000.0) * uptake;
        for side in [-1.0, 1.0] {
            let s = shape(j(side * 65.0 * sx), j(75.0 * sy), u(18.0, 26.0), u(24.0, 32.0), kz, kz + u(90.0, 120.0), 25.0);
            regions.push(Region { name: "kidney", shape: s, activity: kidney, mu: WATER, texture: Texture::default() });
        }
        let vr = u(14.0, 20.0);
        let s = Shape { harmonics: Vec::new(), angle: 0.0, power: 2.0, ..shape(j(0.0) * 0.3, 75.0 * sy, vr, vr, zt, zb, 0.0) };
        regions.push(Region { name: "marrow", shape: s, activity: u(3_000.0, 6_000.0) * uptake, mu: 0.0130, texture: Texture::default() });
        let fat_bqml = u(700.0, 1_500.0) * uptake;
        let muscle_bqml = u(2_000.0, 3_800.0) * uptake;
        let mut p = Patient {
            family,
            seed,
            body,
            muscle,
            fat_bqml,
            muscle_bqml,
            soft_texture: Texture::default(),
            regions,
            lesions: Vec::new(),
            counts_90s: u(1.4e6, 3.0e6),
        };
        let n_lesions = rng.borrow_mut().random_range(2..=6);
        for _ in 0..n_lesions {
            for _try in 0..400 {
                let x = u(-bx, bx);
                let y = u(-by, by);
                let z = u(lesion_z0, lesion_z1.max(lesion_z0 + 1e-3));
                if !p.muscle.inside(x, y, z) {
                    continue;
                }
                let (host, bg) = p.host_at(x, y, z);
                // Organs carry most lesions; the background takes a few.
                let keep = match host {
                    "liver" | "lung" => 1.0,
                    "spleen" | "kidney" | "marrow" => 0.6,
                    "blood" | "myocardium" => 0.0,
                    _ => 0.25,
                };
                if !rng.borrow_mut().random_bool(keep) {
                    continue;
                }
                let d = (u(4f64.ln(), 30f64.ln())).exp();
                let contrast = u(2.0, 10.0);
                p.lesions.push(Lesion {
                    x_mm: x,
                    y_mm: y,
                    z_mm: z,
                    diameter_mm: d,
                    activity_bqml: bg * contrast,
                    background_bqml: bg,
                    host,
                });
                break;
            }
        }
        if family == Family::Textured {
            // drawn last, so nothing above depends on them; the blood pool
            // stays uniform (it is a well-mixed fluid)
            let mut draw = |a: f64, b: f64| rng.borrow_mut().random_range(a..b);
            p.soft_texture = Texture::draw(&mut draw);
            for r in p.regions.iter_mut().filter(|r| r.name != "blood") {
                r.texture = Texture::draw(&mut draw);
            }
        }
        p
    }

    /// The region name and activity at a point, lesions and texture aside.
    fn host_at(&self, x: f64, y: f64, z: f64) -> (&'static str, f64) {
        let (name, a, _) = self.host(x, y, z);
        (name, a)
    }

    /// The region at a point: its name, activity and texture.
    fn host(&self, x: f64, y: f64, z: f64) -> (&'static str, f64, &Texture) {
        if !self.body.inside(x, y, z) {
            return ("air", 0.0, &self.soft_texture);
        }
        let mut host = if self.muscle.inside(x, y, z) {
            ("muscle", self.muscle_bqml, &self.soft_texture)
        } else {
            ("fat", self.fat_bqml, &self.soft_texture)
        };
        for r in &self.regions {
            if r.shape.inside(x, y, z) {
                host = (r.name, r.activity, &r.texture);
            }
        }
        host
    }

    /// Activity (Bq/ml).
    pub fn activity(&self, x: f64, y: f64, z: f64) -> f64 {
        let (_, mut a, texture) = self.host(x, y, z);
        if a == 0.0 {
            return 0.0;
        }
        if !texture.0.is_empty() {
            a *= texture.factor(x, y, z);
        }
        for l in &self.lesions {
            if (x - l.x_mm).powi(2) + (y - l.y_mm).powi(2) + (z - l.z_mm).powi(2) <= (l.diameter_mm / 2.0).powi(2) {
                a = l.activity_bqml;
            }
        }
        a
    }

    /// Attenuation (1/mm).
    pub fn mu(&self, x: f64, y: f64, z: f64) -> f64 {
        if !self.body.inside(x, y, z) {
            return 0.0;
        }
        let mut m = WATER;
        for r in &self.regions {
            if r.shape.inside(x, y, z) {
                m = r.mu;
            }
        }
        m
    }

    /// z (mm) of a slice through the liver, for calibration.
    pub fn liver_z(&self) -> f64 {
        self.regions.iter().find(|r| r.name == "liver").map(|r| (r.shape.z0 + r.shape.z1) / 2.0).unwrap_or(150.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_patient_and_families_differ() {
        let a = Patient::generate(Family::Ellipse, 7, 0.0, 100.0);
        let b = Patient::generate(Family::Ellipse, 7, 0.0, 100.0);
        assert_eq!(a.lesions.len(), b.lesions.len());
        assert_eq!(a.activity(10.0, 20.0, 50.0), b.activity(10.0, 20.0, 50.0));
        let c = Patient::generate(Family::Lobulated, 7, 0.0, 100.0);
        assert!(c.regions.iter().any(|r| !r.shape.harmonics.is_empty()));
        assert!(a.regions.iter().all(|r| r.shape.harmonics.is_empty()));
    }

    #[test]
    fn the_textured_family_has_other_outlines_and_uneven_organs() {
        for seed in 0..10 {
            let e = Patient::generate(Family::Ellipse, seed, 0.0, 100.0);
            assert!(e.regions.iter().all(|r| r.texture.0.is_empty() && r.shape.power == 2.0), "ellipse patients stay uniform ellipses");
            let t = Patient::generate(Family::Textured, seed, 0.0, 100.0);
            assert!(t.regions.iter().any(|r| r.shape.power != 2.0 && r.shape.angle != 0.0));
            let liver = t.regions.iter().find(|r| r.name == "liver").unwrap();
            assert!(!liver.texture.0.is_empty());
            // the liver's uptake varies inside it, by no more than 15 %
            let (cx, cy, z) = (liver.shape.cx, liver.shape.cy, (liver.shape.z0 + liver.shape.z1) / 2.0);
            let mut seen = Vec::new();
            for dx in [-20.0, -10.0, 0.0, 10.0, 20.0] {
                for dz in [-20.0, 0.0, 20.0] {
                    let (x, y, zz) = (cx + dx, cy, z + dz);
                    if t.host_at(x, y, zz).0 == "liver"
                        && t.lesions.iter().all(|l| (l.x_mm - x).hypot(l.y_mm - y).hypot(l.z_mm - zz) > l.diameter_mm)
                    {
                        seen.push(t.activity(x, y, zz) / liver.activity);
                    }
                }
            }
            assert!(seen.len() >= 3, "seed {seed}: {seen:?}");
            assert!(seen.iter().all(|f| (0.85..=1.15).contains(f)), "seed {seed}: {seen:?}");
            let spread = seen.iter().cloned().fold(f64::MIN, f64::max) - seen.iter().cloned().fold(f64::MAX, f64::min);
            assert!(spread > 0.005, "seed {seed}: uniform liver {seen:?}");
        }
        // the blood pool is a well-mixed fluid
        let t = Patient::generate(Family::Textured, 3, 0.0, 100.0);
        assert!(t.regions.iter().filter(|r| r.name == "blood").all(|r| r.texture.0.is_empty()));
    }

    #[test]
    fn lesions_are_in_range_hot_and_inside_the_body() {
        let mut n = 0;
        for seed in 0..40 {
            let p = Patient::generate(Family::Ellipse, seed, 20.0, 80.0);
            for l in &p.lesions {
                n += 1;
                assert!((4.0..=30.0).contains(&l.diameter_mm), "{l:?}");
                let c = l.activity_bqml / l.background_bqml;
                assert!((2.0..=10.0).contains(&c), "{l:?}");
                assert!((20.0..=80.0).contains(&l.z_mm));
                // lesions may overlap (a later one paints over); a lone one is what it says
                let alone = p.lesions.iter().filter(|o| {
                    let d = ((o.x_mm - l.x_mm).powi(2) + (o.y_mm - l.y_mm).powi(2) + (o.z_mm - l.z_mm).powi(2)).sqrt();
                    d < (o.diameter_mm + l.diameter_mm) / 2.0
                });
                if alone.count() == 1 {
                    assert_eq!(p.activity(l.x_mm, l.y_mm, l.z_mm), l.activity_bqml);
                }
            }
        }
        assert!(n >= 80, "{n} lesions in 40 patients");
    }
}
