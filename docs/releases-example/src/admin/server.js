// The example admin: serves what its build hook wrote (dist/index.html); /health answers 200 "ok".
const fs = require("fs");
const http = require("http");
const path = require("path");
const port = Number(process.env.PORT || 3001);
const version = fs.readFileSync(path.join(__dirname, "VERSION"), "utf8").trim();
http.createServer((req, res) => {
  if (req.url === "/health") { res.writeHead(200); return res.end("ok"); }
  res.writeHead(200, {"content-type": "text/html", "x-version": version});
  res.end(fs.readFileSync(path.join(__dirname, "dist", "index.html")));
}).listen(port, "127.0.0.1");
