#!/usr/bin/env node
// A small balsam-grpc client in Node.js: loads the .proto files of protos/ at run time
// (no generated code), creates a site, an app and a few jobs, then watches their events
// with EventService.WatchEvents while moving them to final states: the first is run by a
// launcher session (SessionService.Connect: leased, then reported done), the rest are
// killed. Exits once every job is final. Output: one JSON object per line.
//
// Usage: node client.js [--address HOST:PORT] [--token TOKEN] [--jobs N] [--protos DIR]
//   address and token default to BALSAM_SERVER and BALSAM_TOKEN.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const FINAL = new Set(['JOB_STATE_JOB_FINISHED', 'JOB_STATE_FAILED', 'JOB_STATE_KILLED']);

function parseArgs(argv) {
  const args = {
    address: process.env.BALSAM_SERVER || '127.0.0.1:50051',
    token: process.env.BALSAM_TOKEN || '',
    jobs: 3,
    protos: path.resolve(__dirname, '..', '..', 'protos'),
    timeoutMs: 30000,
  };
  for (let i = 0; i < argv.length; i += 1) {
    const key = argv[i].replace(/^--/, '');
    const value = argv[i + 1];
    if (!(key in { address: 1, token: 1, jobs: 1, protos: 1 }) || value === undefined) {
      throw new Error(`unknown or incomplete argument ${argv[i]}`);
    }
    args[key] = key === 'jobs' ? Number(value) : value;
    i += 1;
  }
  if (!args.token) throw new Error('no token: pass --token or set BALSAM_TOKEN');
  if (!Number.isInteger(args.jobs) || args.jobs < 1) throw new Error('--jobs must be a positive integer');
  return args;
}

function loadServices(protoDir) {
  const files = ['site_service', 'app_service', 'job_service', 'event_service', 'session_service'].map(
    (name) => `balsam/v1/${name}.proto`);
  const definition = protoLoader.loadSync(files, {
    includeDirs: [protoDir],
    keepCase: true, // field names as in the .proto (snake_case)
    longs: String, // int64 ids as strings: no precision loss
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).balsam.v1;
}

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

// Promise wrapper of a unary call with auth metadata and a deadline.
function unary(client, method, request, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    client[method](request, metadata, { deadline }, (err, response) => {
      if (err) {
        reject(new Error(`${method} failed: ${grpc.status[err.code]}: ${err.details}`));
      } else {
        resolve(response);
      }
    });
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const v1 = loadServices(args.protos);
  const creds = grpc.credentials.createInsecure();
  const options = { 'grpc.keepalive_time_ms': 20000, 'grpc.keepalive_timeout_ms': 10000 };
  const sites = new v1.SiteService(args.address, creds, options);
  const apps = new v1.AppService(args.address, creds, options);
  const jobs = new v1.JobService(args.address, creds, options);
  const events = new v1.EventService(args.address, creds, options);
  const sessions = new v1.SessionService(args.address, creds, options);
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${args.token}`);
  const call = (client, method, request) => unary(client, method, request, metadata, args.timeoutMs);
  const requestId = () => `node-${process.pid}-${Date.now()}-${Math.random().toString(16).slice(2)}`;

  const suffix = `${process.pid}-${Date.now()}`;
  const { site } = await call(sites, 'CreateSite', {
    site: { name: `node-${suffix}`, hostname: 'localhost', path: '/tmp/node-site' },
    request_id: requestId(),
  });
  const { app } = await call(apps, 'CreateApp', {
    app: {
      site_id: site.id,
      name: 'greet',
      command_template: 'echo hello {{ who }}',
      parameters: [{ name: 'who', required: true }],
    },
    request_id: requestId(),
  });
  const created = await call(jobs, 'BatchCreateJobs', {
    jobs: Array.from({ length: args.jobs }, (_, i) => ({
      app_id: app.id,
      workdir: `node/${suffix}/${i}`,
      parameters: { who: `node-${i}` },
      tags: { client: 'node' },
    })),
    request_id: requestId(),
  });
  const ids = created.jobs.map((j) => j.id);
  emit({ type: 'created', site_id: site.id, app_id: app.id, job_ids: ids, states: created.jobs.map((j) => j.state) });

  // Watch first (the first response carries the starting cursor), then change states:
  // nothing can slip between.
  const pending = new Set(ids);
  const stream = events.WatchEvents({ filter: { job_ids: ids } }, metadata);
  const finished = new Promise((resolve, reject) => {
    let started = false;
    stream.on('data', (response) => {
      for (const ev of response.events) {
        const change = ev.job_state;
        if (!change) continue;
        emit({ type: 'event', id: ev.id, job_id: ev.job_id, from: change.from_state, to: change.to_state });
        if (FINAL.has(change.to_state)) pending.delete(ev.job_id);
      }
      if (!started) {
        started = true;
        emit({ type: 'watching', cursor: response.cursor });
        stream.emit('started');
      }
      if (pending.size === 0) {
        stream.cancel();
        resolve();
      }
    });
    stream.on('error', (err) => {
      if (err.code === grpc.status.CANCELLED && pending.size === 0) return;
      reject(new Error(`WatchEvents failed: ${grpc.status[err.code]}: ${err.details}`));
    });
  });
  await new Promise((resolve) => stream.once('started', resolve));

  // The first job runs in a launcher session (only a lease moves a job to RUNNING); the
  // rest are killed.
  const [first, ...rest] = ids;
  await runOne(sessions, metadata, site.id, first, args.timeoutMs);
  emit({ type: 'ran', job_id: first });
  if (rest.length) {
    const killed = await call(jobs, 'BatchUpdateJobs', {
      filter: { ids: rest },
      patch: { state: 'JOB_STATE_KILLED', state_message: 'killed from node' },
      update_mask: { paths: ['state', 'state_message'] },
      request_id: requestId(),
    });
    emit({ type: 'killed', updated: Number(killed.updated_count), failed: Number(killed.failed_count) });
  }

  const timer = setTimeout(() => {
    emit({ type: 'timeout', pending: [...pending] });
    process.exit(2);
  }, args.timeoutMs);
  await finished;
  clearTimeout(timer);
  const counts = await call(jobs, 'CountJobs', { filter: { ids }, group_by: ['JOB_GROUP_BY_STATE'] });
  const byState = {};
  for (const g of counts.groups) byState[g.state] = Number(g.count);
  emit({ type: 'done', total: Number(counts.total), by_state: byState });
  [sites, apps, jobs, events].forEach((c) => c.close());
}

// What a launcher does, in miniature: open a session at the site, grant credit for one
// job with this job's tags, report its run done, close. Resolves when the server has
// acknowledged the report.
function runOne(sessions, metadata, siteId, jobId, timeoutMs) {
  return new Promise((resolve, reject) => {
    const stream = sessions.Connect(metadata, { deadline: new Date(Date.now() + timeoutMs) });
    let done = false;
    stream.on('data', (response) => {
      if (response.opened) {
        stream.write({ credit: { max_jobs: 1, free_nodes: 1 } });
      } else if (response.leases) {
        const leased = response.leases.jobs.find((lj) => lj.job.id === jobId);
        if (!leased) {
          reject(new Error(`expected a lease of job ${jobId}, got ${JSON.stringify(response.leases.jobs)}`));
          return;
        }
        stream.write({
          report: {
            transitions: [{ seq: 1, job_id: jobId, lease_generation: leased.lease_generation,
              state: 'JOB_STATE_RUN_DONE', return_code: 0 }],
          },
        });
      } else if (response.ack) {
        if (response.ack.rejections.length) {
          reject(new Error(`report rejected: ${JSON.stringify(response.ack.rejections)}`));
          return;
        }
        done = true;
        stream.write({ close: { reason: 'node client done' } });
        stream.end();
      }
    });
    stream.on('error', (err) => reject(new Error(`session failed: ${grpc.status[err.code]}: ${err.details}`)));
    stream.on('end', () => (done ? resolve() : reject(new Error('session ended before the report was acknowledged'))));
    stream.write({ open: { site_id: siteId, hostname: 'node-client', job_mode: 'JOB_MODE_SERIAL' } });
  });
}

main().catch((err) => {
  process.stderr.write(`error: ${err.message}\n`);
  process.exit(1);
});
