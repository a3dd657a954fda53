import { api } from "./console.js";
