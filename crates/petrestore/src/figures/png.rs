//! A minimal PNG writer for the figures: 8-bit RGB, zlib "stored"
//! (uncompressed) blocks, so no image or compression crate is needed. The
//! files are a few hundred KiB; any viewer opens them.

use std::io::Write;
use std::path::Path;

/// An RGB image, row-major, 3 bytes per pixel.
#[derive(Clone)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Rgb {
    pub fn new(width: usize, height: usize, fill: [u8; 3]) -> Rgb {
        Rgb { width, height, pixels: fill.iter().copied().cycle().take(width * height * 3).collect() }
    }

    pub fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A straight line (Bresenham), `w` pixels thick.
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], w: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for oy in -(w / 2)..=(w / 2) {
                for ox in -(w / 2)..=(w / 2) {
                    if x + ox >= 0 && y + oy >= 0 {
                        self.set((x + ox) as usize, (y + oy) as usize, c);
                    }
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks(self.width * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &zlib_stored(&raw));
        chunk(&mut png, b"IEND", &[]);
        let mut f = std::fs::File::create(path)?;
        f.write_all(&png)?;
        f.sync_all()
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

/// zlib stream of stored deflate blocks (at most 65535 bytes each).
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(65535).collect() };
    let last = blocks.len() - 1;
    for (i, b) in blocks.into_iter().enumerate() {
        out.push(u8::from(i == last));
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        out.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_files_are_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = Rgb::new(300, 250, [255, 255, 255]);
        img.line((0, 0), (299, 249), [255, 0, 0], 3);
        let p = dir.path().join("x.png");
        img.write(&p).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        // every chunk's CRC checks, and IEND ends the file
        let mut at = 8;
        let mut kinds = Vec::new();
        while at < b.len() {
            let n = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            let kind = &b[at + 4..at + 8];
            let crc = u32::from_be_bytes(b[at + 8 + n..at + 12 + n].try_into().unwrap());
            assert_eq!(crc, crc32fast::hash(&b[at + 4..at + 8 + n]));
            kinds.push(String::from_utf8_lossy(kind).into_owned());
            at += 12 + n;
        }
        assert_eq!(kinds, ["IHDR", "IDAT", "IEND"]);
        assert_eq!(at, b.len());
    }
}
