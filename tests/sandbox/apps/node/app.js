// A node-postgres (pg 8, pinned by package-lock.json) app served by Node's own http module.
//
// NODE_MODE:
// - pool: a pg.Pool of POOL_MAX connections (default 2), opened on demand and never closed for
//   idleness (idleTimeoutMillis 0), with an 'error' listener on the pool (an idle client that
//   dies is dropped) and on each client it opens (one that dies while lent fails its request
//   instead of the process): a healthy app, as node-postgres' documentation asks;
// - leak: each request opens a pg.Client, runs its queries and never ends it (the client stays
//   referenced, as one kept in a cache or a global is), with no 'error' listener: when the
//   server closes such a client's connection, node-postgres emits 'error' on it and the process
//   exits ("dies on termination");
// - leak-listen: the same leak, with an 'error' listener on each client that logs what killed it.
//
// /work?idle=S runs a query and, with idle > 0, holds the connection idle S seconds (at most 30)
// and runs a second, as sandbox/apps/pools.py does; /healthz answers 200. One JSON line per
// request (event "request", outcome, idle, ms, kind, and for a failure error and reason), errors
// classified by the phrases of sandbox.workloads.outcomes (passed in OUTCOME_PHRASES); only the
// matched phrase is logged, never the server's message. DATABASE_URL is the DSN, PGAPPNAME the
// application_name, APP_PORT the port.
'use strict'

const http = require('node:http')
const pg = require('pg')

const QUERY_1 = 'SELECT count(*) FROM pg_catalog.pg_class'
const QUERY_2 = 'SELECT count(*) FROM pg_catalog.pg_namespace'
const MAX_IDLE = 30 // seconds

const MODE = process.env.NODE_MODE || 'pool'
const POOL_MAX = Number.parseInt(process.env.POOL_MAX || '2', 10)
const APPNAME = process.env.PGAPPNAME || 'node-app'
const PORT = Number.parseInt(process.env.APP_PORT || '8000', 10)
const PHRASES = JSON.parse(process.env.OUTCOME_PHRASES || '{"refused": [], "terminated": []}')
const CONNECTION = { connectionString: process.env.DATABASE_URL, application_name: APPNAME }

function log(event, fields) {
  const time = new Date().toISOString().replace('Z', '+00:00')
  process.stdout.write(JSON.stringify({ time, event, ...fields }) + '\n')
}

// [outcome, reason] for an error, as sandbox.workloads.outcomes.classify does.
function classify(err, inFlight) {
  const text = String((err && err.message) || err).toLowerCase()
  for (const phrase of PHRASES.refused) {
    if (text.includes(phrase)) return ['refused', phrase]
  }
  for (const phrase of PHRASES.terminated) {
    if (text.includes(phrase)) return [inFlight ? 'inflight_broken' : 'terminated', phrase]
  }
  return ['error', '']
}

function errorFields(err, inFlight) {
  const [outcome, reason] = classify(err, inFlight)
  return { outcome, error: (err && err.constructor && err.constructor.name) || 'Error', reason }
}

// lend(use): runs use(query) with a connection, where query(sql) resolves when sql has answered.
function pooled() {
  const pool = new pg.Pool({ ...CONNECTION, max: POOL_MAX, idleTimeoutMillis: 0 })
  const broken = new WeakMap() // client -> the error that killed it while lent
  pool.on('error', (err) => log('idle_error', errorFields(err, false)))
  pool.on('connect', (client) => {
    client.on('error', (err) => {
      if (!broken.has(client)) broken.set(client, err)
    })
  })
  return async (use) => {
    const client = await pool.connect()
    try {
      await use((sql) => (broken.has(client) ? Promise.reject(broken.get(client)) : client.query(sql)))
    } catch (err) {
      client.release(err) // a client that failed is destroyed, not lent again
      throw err
    }
    client.release()
  }
}

function leaking(listen) {
  const leaked = [] // the leak: every client, kept, never ended
  return async (use) => {
    const client = new pg.Client(CONNECTION)
    if (listen) {
      let logged = false // one line per client ('error' comes again when the socket closes)
      client.on('error', (err) => {
        if (!logged) log('client_error', { ...errorFields(err, false), leaked: leaked.length })
        logged = true
      })
    }
    await client.connect()
    leaked.push(client)
    await use((sql) => client.query(sql))
  }
}

async function work(lend, idle) {
  const started = performance.now()
  let inFlight = false
  let fields = { outcome: 'ok' }
  try {
    await lend(async (query) => {
      await query(QUERY_1)
      inFlight = true
      if (idle > 0) {
        await new Promise((resolve) => setTimeout(resolve, idle * 1000))
        await query(QUERY_2)
      }
    })
  } catch (err) {
    fields = errorFields(err, inFlight)
  }
  const ms = Math.round(performance.now() - started)
  log('request', { ...fields, idle, ms, kind: MODE })
  return fields
}

function reply(res, status, body) {
  const data = JSON.stringify(body)
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) })
  res.end(data)
}

function serve() {
  const lend = MODE === 'pool' ? pooled() : leaking(MODE === 'leak-listen')
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://app')
    if (url.pathname === '/healthz') return reply(res, 200, { ok: true })
    if (url.pathname !== '/work') return reply(res, 404, { error: 'not found' })
    const asked = Number.parseFloat(url.searchParams.get('idle') || '0')
    const idle = Number.isFinite(asked) ? Math.min(MAX_IDLE, Math.max(0, asked)) : 0
    work(lend, idle).then((fields) => reply(res, fields.outcome === 'ok' ? 200 : 503, fields))
  })
  server.listen(PORT, '0.0.0.0', () => {
    const version = require('pg/package.json').version
    log('pool_ready', { kind: MODE, size: MODE === 'pool' ? POOL_MAX : 0, pid: process.pid, pg: version })
  })
}

if (require.main === module) serve()
module.exports = { classify } // for tests/unit/test_node_app.py
