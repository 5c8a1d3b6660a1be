//! Pictures for people: panels of volumes side by side on one scale
//! (inverted grey, as PET is read: white 0, black at the top of the scale)
//! with a colour bar at the right, coronal MIPs and axial slices, and line
//! profiles. `petrestore demo` and site acceptance (`petrestore eval
//! --figures`) draw with them; [`png`] writes the files.

pub mod png;

use std::path::Path;

use crate::restore::Volume;
use png::Rgb;

/// One 2D image in mm-square pixels (rows top to bottom).
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

const GAP: usize = 12;
const BAR: usize = 24;

fn grey(v: f32, top: f32) -> [u8; 3] {
    let g = 255.0 - (v / top).clamp(0.0, 1.0) * 255.0;
    [g as u8; 3]
}

/// Resample to square pixels of `mm` with nearest neighbours.
fn square(data: &[f32], w: usize, h: usize, px_w: f64, px_h: f64, mm: f64) -> Image {
    let (nw, nh) = (((w as f64 * px_w) / mm).round().max(1.0) as usize, ((h as f64 * px_h) / mm).round().max(1.0) as usize);
    let mut out = vec![0.0; nw * nh];
    for y in 0..nh {
        let sy = ((y as f64 + 0.5) * mm / px_h).floor().min(h as f64 - 1.0) as usize;
        for x in 0..nw {
            let sx = ((x as f64 + 0.5) * mm / px_w).floor().min(w as f64 - 1.0) as usize;
            out[y * nw + x] = data[sy * w + sx];
        }
    }
    Image { width: nw, height: nh, data: out }
}

/// Coronal maximum intensity projection, head at the top (the volume's
/// last slice, as the simulator writes the slab head first).
pub fn coronal_mip(v: &Volume, mm: f64) -> Image {
    let (nx, ny, nz) = (v.nx, v.ny, v.nz);
    let mut m = vec![0.0f32; nx * nz];
    for z in 0..nz {
        let row = nz - 1 - z;
        for y in 0..ny {
            for x in 0..nx {
                let val = v.data[(z * ny + y) * nx + x];
                if val > m[row * nx + x] {
                    m[row * nx + x] = val;
                }
            }
        }
    }
    square(&m, nx, nz, v.spacing[0], v.spacing[2], mm)
}

/// One axial slice (volume index `z`).
pub fn axial(v: &Volume, z: usize, mm: f64) -> Image {
    square(v.slice(z), v.nx, v.ny, v.spacing[0], v.spacing[1], mm)
}

/// Keep only the columns where the last image (the truth, exactly 0 in
/// air) has activity, plus a margin: the field of view is wider than the body.
pub fn crop_to_body(images: &mut [Image], margin: usize) {
    let w = images[0].width;
    let truth = &images[images.len() - 1];
    let used = |x: usize| (0..truth.height).any(|y| truth.data[y * truth.width + x] > 0.0);
    let (Some(first), Some(last)) = ((0..w).find(|x| used(*x)), (0..w).rev().find(|x| used(*x))) else { return };
    let (a, b) = (first.saturating_sub(margin), (last + margin).min(w - 1));
    for im in images.iter_mut() {
        let nw = b - a + 1;
        let data = (0..im.height).flat_map(|y| im.data[y * im.width + a..=y * im.width + b].to_vec()).collect();
        *im = Image { width: nw, height: im.height, data };
    }
}

/// Panels on one scale (`top` is black) in a row, or in a column for wide
/// images (a coronal view of a slab), with a colour bar at the right.
pub fn panels(images: &[Image], top: f32, zoom: usize) -> Rgb {
    let (w, h) = (images[0].width * zoom, images[0].height * zoom);
    let column = w > 2 * h;
    let n = images.len();
    let (cols, rows) = if column { (1, n) } else { (n, 1) };
    let height = rows * (h + GAP) + GAP;
    let mut out = Rgb::new(GAP + cols * (w + GAP) + BAR + GAP, height, [255, 255, 255]);
    for (k, im) in images.iter().enumerate() {
        let (x0, y0) = if column { (GAP, GAP + k * (h + GAP)) } else { (GAP + k * (w + GAP), GAP) };
        for y in 0..h {
            for x in 0..w {
                out.set(x0 + x, y0 + y, grey(im.data[(y / zoom) * im.width + x / zoom], top));
            }
        }
    }
    // colour bar over the full height: top of the scale at the top, framed
    let xb = GAP + cols * (w + GAP);
    let bh = height - 2 * GAP;
    for y in 0..bh {
        let c = grey(top * (1.0 - y as f32 / (bh - 1).max(1) as f32), top);
        for x in 0..BAR {
            out.set(xb + x, GAP + y, c);
        }
    }
    for y in [GAP - 1, GAP + bh] {
        for x in xb..xb + BAR {
            out.set(x, y, [0, 0, 0]);
        }
    }
    for x in [xb, xb + BAR - 1] {
        for y in GAP..GAP + bh {
            out.set(x, y, [0, 0, 0]);
        }
    }
    out
}

/// The curves' colours, in the order of the panels: input, restored, 90 s, truth.
pub const CURVES: [([u8; 3], &str); 4] = [([150, 150, 150], "grey"), ([220, 30, 30], "red"), ([30, 80, 220], "blue"), ([0, 0, 0], "black")];

/// Line profiles on common axes (x: position, y: 0 to `top`), with a light
/// grid at every fifth of the scale.
pub fn profile_plot(curves: &[Vec<f32>], top: f32, path: &Path) -> std::io::Result<()> {
    let (w, h, m) = (720usize, 360usize, 30usize);
    let mut img = Rgb::new(w, h, [255, 255, 255]);
    for k in 0..=5 {
        let y = (h - m) as i64 - ((h - 2 * m) * k / 5) as i64;
        img.line((m as i64, y), ((w - m) as i64, y), [225, 225, 225], 1);
    }
    img.line((m as i64, (h - m) as i64), ((w - m) as i64, (h - m) as i64), [0, 0, 0], 1);
    img.line((m as i64, m as i64), (m as i64, (h - m) as i64), [0, 0, 0], 1);
    for (c, (colour, _)) in curves.iter().zip(CURVES) {
        let n = c.len().max(2);
        let pt = |i: usize| {
            let x = m as f64 + (w - 2 * m) as f64 * i as f64 / (n - 1) as f64;
            let y = (h - m) as f64 - (h - 2 * m) as f64 * (c[i] / top).clamp(0.0, 1.05) as f64;
            (x.round() as i64, y.round() as i64)
        };
        for i in 1..c.len() {
            img.line(pt(i - 1), pt(i), colour, 2);
        }
    }
    img.write(path)
}
