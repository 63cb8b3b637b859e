// The example backend: /health answers 200 "ok" (Kasa's health check), / names the component and its version.
const fs = require("fs");
const http = require("http");
const path = require("path");
const port = Number(process.env.PORT || 3000);
const version = fs.readFileSync(path.join(__dirname, "VERSION"), "utf8").trim();
http.createServer((req, res) => {
  if (req.url === "/health") { res.writeHead(200); return res.end("ok"); }
  res.writeHead(200, {"content-type": "text/plain"});
  res.end(`backend ${version}\n`);
}).listen(port, "127.0.0.1");
