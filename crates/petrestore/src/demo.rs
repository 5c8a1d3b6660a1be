//! `petrestore demo`: the whole loop on loopback with no setup. A synthetic
//! 30 s PET study is sent (as a console would) to a daemon on a free port,
//! which restores it and forwards the derived series to a built-in receiving
//! SCP (standing in for PACS); then a summary is printed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AllowedCaller, Destination, Settings};
use crate::egress::scu;
use crate::ingest::{self, ScpConfig, store::FolderSink};
use crate::restore::volume;
use petsim::{self as sim, SeriesSpec};

/// Demo knobs (all have defaults).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where to put everything; a fresh temporary folder when `None`.
    pub workdir: Option<PathBuf>,
    pub spec: SeriesSpec,
}

fn roi_stats(v: &volume::Volume, spec: &SeriesSpec) -> (f64, f64) {
    let (xr, yr, zr) = sim::liver_roi(spec);
    let mut vals = Vec::new();
    for z in zr {
        for y in yr.clone() {
            for x in xr.clone() {
                vals.push(v.data[(z * v.ny + y) * v.nx + x] as f64);
            }
        }
    }
    let mean = vals.iter().sum::<f64>() / vals.len().max(1) as f64;
    let sd = (vals.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / vals.len().max(1) as f64).sqrt();
    (mean, sd)
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let work = match &opts.workdir {
        Some(p) => p.clone(),
        None => {
            let p = std::env::temp_dir().join(format!("petrestore-demo-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            p
        }
    };
    let input = work.join("input");
    let received = work.join("pacs");
    std::fs::create_dir_all(&received).with_context(|| format!("cannot create {}", received.display()))?;
    let spec = opts.spec.clone();
    println!("petrestore demo: working in {}", work.display());
    let series = sim::write_series(&input, &spec).context("cannot write the synthetic study")?;
    println!(
        "  1. made a synthetic FDG PET series: {} slices of {}x{}, {} s per bed",
        spec.slices, spec.matrix, spec.matrix, spec.frame_duration_s
    );

    // The built-in receiver plays PACS.
    let pacs_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let pacs_addr = pacs_listener.local_addr()?;
    let stop_pacs = CancellationToken::new();
    let pacs = tokio::spawn(ingest::serve(
        pacs_listener,
        Arc::new(ScpConfig {
            ae_title: "DEMO-PACS".into(),
            allowed_callers: None,
            abstract_syntaxes: crate::dicom::PET_STORAGE_CLASSES.iter().map(|s| s.to_string()).collect(),
            max_associations: 4,
            max_associations_per_peer: 4,
            artim_timeout: Duration::from_secs(10),
            max_pdu_length: 65536,
            max_buffered_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(30),
            draining: Default::default(),
            live: None,
        }),
        Arc::new(FolderSink { dir: received.clone() }),
        stop_pacs.clone(),
        TaskTracker::new(),
    ));

    let mut settings = Settings::defaults();
    settings.node.state_dir = work.join("state");
    settings.node.min_free_bytes = 64 * 1024 * 1024;
    settings.dicom.listen = "127.0.0.1:0".parse().expect("literal address");
    settings.dicom.allowed_callers = vec![AllowedCaller { ae_title: "DEMO-CONSOLE".into(), host: None }];
    settings.series.quiet_timeout = Duration::from_secs(10);
    settings.destinations = vec![Destination { name: "demo-pacs".into(), ae_title: "DEMO-PACS".into(), address: pacs_addr.to_string() }];
    let daemon = crate::app::start(settings.clone()).await?;
    println!("  2. started the daemon on {} (AE {}), destination DEMO-PACS on {pacs_addr}", daemon.dicom_addr, settings.dicom.ae_title);

    let t0 = Instant::now();
    let peer =
        scu::Peer { address: daemon.dicom_addr.to_string(), called_ae: settings.dicom.ae_title.clone(), calling_ae: "DEMO-CONSOLE".into() };
    let sent = scu::send_files(&peer, &series.files, &CancellationToken::new()).await.context("sending the study to the daemon")?;
    println!("  3. sent {sent} instances as console DEMO-CONSOLE in {:.2} s", t0.elapsed().as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs(300);
    let job_id = crate::journal::job_id(&series.series_uid);
    let job = loop {
        let job = daemon.journal().get(&job_id)?;
        if let Some(j) = job.filter(|j| j.state.is_terminal()) {
            break j;
        }
        if Instant::now() > deadline {
            bail!("the derived series did not arrive within 5 minutes; see the log above");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = t0.elapsed();
    daemon.stop().await?;
    stop_pacs.cancel();
    let _ = pacs.await;

    let mut out_files: Vec<PathBuf> = std::fs::read_dir(&received)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    out_files.sort();
    println!(
        "  4. job {job_id}: {} after {:.2} s; {} derived instances at the receiver",
        job.state.name(),
        elapsed.as_secs_f64(),
        out_files.len()
    );
    if job.state != crate::journal::JobState::Done {
        bail!("job ended as {:?}", job.state);
    }
    let src = volume::load(&series.files).map_err(anyhow::Error::msg)?;
    let out = volume::load(&out_files).map_err(anyhow::Error::msg)?;
    println!();
    // The uniform liver region lies 75 mm and more below the first slice.
    if spec.slices as f64 * spec.slice_thickness_mm > 80.0 {
        let (m0, s0) = roi_stats(&src.volume, &spec);
        let (m1, s1) = roi_stats(&out.volume, &spec);
        println!("  liver region          mean (Bq/ml)   noise (SD/mean)");
        println!("  input  ({:>2} s frame)   {m0:>12.0}   {:>8.1} %", spec.frame_duration_s, 100.0 * s0 / m0);
        println!("  output ({})     {m1:>12.0}   {:>8.1} %", job.engine.clone().unwrap_or_default(), 100.0 * s1 / m1);
        println!("  mean change: {:+.2} %  (restoration must not move SUVs)", 100.0 * (m1 / m0 - 1.0));
    } else {
        println!("  (liver statistics need more than 80 mm of slices: use --slices 32 or more)");
    }
    println!("  {} of {} slices restored", out.volume.nz, src.volume.nz);
    println!();
    println!("  input series:    {}", input.display());
    println!("  derived series:  {}", received.display());
    println!("  daemon state:    {}", settings.node.state_dir.display());
    println!("  engine {}: the classical baseline; the neural engines come with the trained model.", job.model_id.unwrap_or_default());
    Ok(())
}
