// The example admin's build hook: writes dist/index.html, which server.js serves.
const fs = require("fs");
const version = fs.readFileSync("VERSION", "utf8").trim();
fs.mkdirSync("dist", {recursive: true});
fs.writeFileSync("dist/index.html", `<h1>admin ${version}</h1>\n`);
